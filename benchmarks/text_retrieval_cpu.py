"""What text mode puts before the question, without the model's answer: does DocumentQA's retrieval bring the gold
evidence into its 2,048-token budget? A cheap signal beside answers (no generation; the CPU).

Haystacks of the RULER-style suite (memllm.bench.ruler: Paul Graham essays with needle sentences, or Wikipedia
paragraphs around SQuAD / HotpotQA gold paragraphs) decoded to text and read by DocumentQA in text mode as `ask`
reads them (chunks of 192 tokens, MiniLM embeddings, the SmolLM2 tokenizer); every question asked as a user asks it
(`Question.query`), through each retrieval (`DocumentQA.retrieval`: `dense`, MiniLM alone; `lexical`, the
rare-word tier first; see RETRIEVALS). Per question: every gold span at least half inside the chunks given
(`gold`), an answer string inside them (`answer`: for multivalue, the share of its values), and where the first
gold span's chunk sits (`rank`: 0 = the chunk nearest the question; the table's mean over the questions whose gold
is there).

    python benchmarks/text_retrieval_cpu.py --lengths 12k,32k,128k --per-family 24 --out benchmarks/results/text_retrieval_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

from memllm import MemLLM
from memllm.agents.docqa import PROMPT_QUESTION, RETRIEVALS, DocumentQA
from memllm.bench import ruler
from memllm.bench.passkey import parse_length
from memllm.documents import read_text


def char_starts(tokenizer, ids: list[int], positions: set[int]) -> dict[int, int]:
    """Token position -> character offset in decode(ids), for the positions asked (prefix decodes)."""
    return {p: len(tokenizer.decode(ids[:p])) for p in sorted(positions)}


def covered(span: tuple[int, int], chunks: list[tuple[int, int]]) -> float:
    s, e = span
    inside = sum(max(0, min(e, b) - max(s, a)) for a, b in chunks)
    return inside / max(1, e - s)


def run_haystack(llm, hay, retrievals, details: list, length: str) -> dict:
    tok = llm.tokenizer
    text = tok.decode(hay.ids)
    positions = {p for q in hay.questions for s in q.spans for p in s}
    at = char_starts(tok, hay.ids, positions)
    qa = DocumentQA(llm, "text", max_new_tokens=24)
    try:
        start = time.perf_counter()
        qa.read(read_text(text, "haystack"))
        read_s = time.perf_counter() - start
        for q in hay.questions:
            question = " ".join((q.query or q.prompt).split())
            budget = qa._text_budget(PROMPT_QUESTION.format(question=question), 24)
            for r in retrievals:
                qa.retrieval = r
                t0 = time.perf_counter()
                evidence, joined = qa._retrieve(question, budget)
                ms = (time.perf_counter() - t0) * 1000
                chunks = [(e.start, e.end) for e in evidence]
                gold = all(covered((at[s], at[e]), chunks) >= 0.5 for s, e in q.spans)
                low = joined.lower()
                hits = [a.lower() in low for a in q.answers]
                answer = sum(hits) / len(hits) if q.match == "all" else float(any(hits))
                first = (at[q.spans[0][0]], at[q.spans[0][1]])
                rank = next((i for i, c in enumerate(chunks) if covered(first, [c]) > 0), None)
                details.append({"length": length, "family": q.family, "id": q.id, "retrieval": r, "gold": gold,
                                "answer": answer, "chunks": len(chunks), "rank": rank, "ms": round(ms, 2)})  # fmt: skip
        return {"read_s": round(read_s, 2), "chunks": qa.chunk_count, "tokens": len(hay.ids)}
    finally:
        qa.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="12k,32k")
    ap.add_argument("--families", default=",".join(ruler.QA_FAMILIES + ruler.NEEDLE_FAMILIES))
    ap.add_argument("--per-family", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrievals", default=",".join(RETRIEVALS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    llm = MemLLM.from_pretrained(args.model, device="cpu", dtype="fp32")
    families = args.families.split(",")
    retrievals = args.retrievals.split(",")
    details: list[dict] = []
    reads = []
    for length in args.lengths.split(","):
        n = parse_length(length)
        for hay in ruler.build_suite(llm.tokenizer, n, families, args.per_family, args.seed):
            reads.append({"length": length, "kind": hay.kind, **run_haystack(llm, hay, retrievals, details, length)})
            print(json.dumps(reads[-1]), flush=True)
    table = {}
    for d in details:
        cell = table.setdefault((d["length"], d["retrieval"]), {})
        g = cell.setdefault(d["family"], [0, 0.0, 0, []])
        g[0] += d["gold"]
        g[1] += d["answer"]
        g[2] += 1
        if d["rank"] is not None:
            g[3].append(d["rank"])
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "args": vars(args)}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "reads": reads, "details": details}, f, indent=1)
    print(json.dumps(env))
    print("length | retrieval | " + " | ".join(f"{f} gold/answer/rank" for f in families))
    for (length, r), cell in table.items():
        print(f"{length} | {r} | " + " | ".join(
            f"{c[0]}/{c[1]:g}/{sum(c[3]) / max(1, len(c[3])):.1f} of {c[2]}" if (c := cell.get(f)) else "-"
            for f in families))  # fmt: skip


if __name__ == "__main__":
    main()
