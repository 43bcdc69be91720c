"""Long-document QA benchmark (issue 6): kv, text, hybrid and truncated full attention side by side.

  python benchmarks/qa_bench.py --lengths 8k,32k --modes kv,text,hybrid,full --questions 5 --device cpu \
      --out benchmarks/qa_cpu.json [--read-once 32k] [--snapshot]

Prints progress, then a table (and the read-once / snapshot results) last; --out writes everything as
JSON (every answer included). --read-once L: one L-token document holding 20 questions' gold
paragraphs, read once in kv mode, time for 20 questions vs 1. --snapshot: the first haystack read in
kv mode, saved, restored in a fresh process, same questions: identical answers? time to first answer.

Machines without the dataset package, faiss or the embedder weights (the GPU box): make a pack here
  python benchmarks/qa_bench.py --make-pack .device/qa/pack.json.gz --lengths ... --questions N
(haystacks + MiniLM embeddings of every chunk and question), and run there with --pack FILE and
--model-dir/--gguf; text retrieval then uses an in-memory exact-cosine store over those embeddings
(the same ranking as the FAISS store's exact index).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memllm.bench import qa as bench  # noqa: E402
from memllm.bench import qa_data  # noqa: E402


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_llm(args):
    if args.model_dir:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from memllm.llm import MemLLM

        kw = {"gguf_file": args.gguf} if args.gguf else {}
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, **kw).to(args.device).eval()
        return MemLLM(model, tok, name="smollm2-135m", trained_len=8192)
    from memllm.llm import MemLLM

    return MemLLM.from_pretrained(args.model, device=args.device)


def embedder_for(args, table=None):
    base = None
    if not args.pack:
        from memllm.memory_stores.embeddings import SentenceTransformerEmbedder

        base = SentenceTransformerEmbedder(device="cuda" if args.device.startswith("cuda") else "cpu")
    return bench.CachedEmbedder(table, base)


def restore_child(args) -> None:
    """In a fresh process: load the model, restore the saved memory, answer; print JSON."""
    t0 = time.perf_counter()
    llm = load_llm(args)
    t1 = time.perf_counter()
    from memllm.agents.docqa import DocumentQA

    qa = DocumentQA.load(llm, args.restore_from)
    t2 = time.perf_counter()
    questions = json.loads(Path(args.restore_from, "questions.json").read_text())
    answers = []
    first = None
    for q in questions:
        a = qa.ask(q)
        answers.append(a.text)
        if first is None:
            first = time.perf_counter() - t2
    print(json.dumps({"model_load_s": t1 - t0, "restore_s": t2 - t1, "first_answer_s": first,
                      "answers": answers}))  # fmt: skip


def snapshot_check(args, llm, hay) -> dict:
    from memllm.agents.docqa import DocumentQA

    qs = [c.question for c in hay.cases]
    with tempfile.TemporaryDirectory(prefix="qa-snap-") as tmp:
        qa = DocumentQA(llm, "kv")
        t0 = time.perf_counter()
        qa.read(hay.text, name="haystack")
        read_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        first = qa.ask(qs[0])
        first_s = time.perf_counter() - t1
        answers = [first.text] + [qa.ask(q).text for q in qs[1:]]
        t2 = time.perf_counter()
        qa.save(Path(tmp) / "mem")
        save_s = time.perf_counter() - t2
        Path(tmp, "mem", "questions.json").write_text(json.dumps(qs))
        size = sum(f.stat().st_size for f in Path(tmp, "mem").rglob("*") if f.is_file())
        cmd = [sys.executable, __file__, "--restore-from", str(Path(tmp) / "mem"), "--device", args.device,
               "--model", args.model]  # fmt: skip
        if args.model_dir:
            cmd += ["--model-dir", args.model_dir] + (["--gguf", args.gguf] if args.gguf else [])
        t3 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        )
        child_s = time.perf_counter() - t3
        if proc.returncode != 0:
            raise SystemExit(f"restore child failed:\n{proc.stderr[-3000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tokens": hay.tokens, "questions": len(qs), "identical": child["answers"] == answers,
            "answers": answers, "restored_answers": child["answers"], "snapshot_bytes": size,
            "read_s": round(read_s, 3), "first_answer_after_read_s": round(first_s, 3), "save_s": round(save_s, 3),
            "restart_model_load_s": round(child["model_load_s"], 3), "restart_restore_s": round(child["restore_s"], 3),
            "restart_first_answer_s": round(child["first_answer_s"], 3), "restart_process_s": round(child_s, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8k,32k")
    ap.add_argument("--modes", default="kv,text,hybrid,full")
    ap.add_argument("--datasets", default="squad,hotpotqa")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--pack", default=None, help="run on haystacks + embeddings from this pack")
    ap.add_argument("--make-pack", default=None, help="write a pack for --lengths/--questions and exit")
    ap.add_argument("--read-once", default=None, help="length for the read-once-ask-many measurement")
    ap.add_argument("--read-once-questions", type=int, default=20)
    ap.add_argument("--snapshot", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="ask at most this many questions per haystack")
    ap.add_argument("--skip-main", action="store_true", help="only --read-once / --snapshot")
    ap.add_argument("--restore-from", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.restore_from:
        restore_child(args)
        return

    lengths = bench.parse_lengths(args.lengths)
    modes = bench.parse_list(args.modes, bench.BENCH_MODES, "mode")
    datasets = bench.parse_list(args.datasets, bench.DATASETS, "dataset")
    t = time.perf_counter()
    llm = load_llm(args)
    say(f"model loaded in {time.perf_counter() - t:.1f} s on {llm.device} ({llm.dtype})")

    if args.make_pack:
        hays = bench.build_all(llm.count_tokens, datasets, lengths, args.questions, args.seed)
        extra = []
        if args.read_once:
            extra = [
                bench.read_once_haystack(
                    llm.count_tokens,
                    bench.parse_lengths(args.read_once)[0],
                    args.read_once_questions,
                    args.seed,
                )
            ]
        emb = embedder_for(args)
        t = time.perf_counter()
        vectors = bench.pack_vectors(llm, hays, emb)
        say(f"{len(vectors)} embeddings in {time.perf_counter() - t:.1f} s")
        Path(args.make_pack).parent.mkdir(parents=True, exist_ok=True)
        qa_data.save_pack(args.make_pack, hays + extra, vectors)
        say(
            f"pack: {len(hays)} haystacks (+{len(extra)} read-once), {Path(args.make_pack).stat().st_size} bytes"
        )
        return

    table = None
    hays = None
    if args.pack:
        all_hays, table = qa_data.load_pack(args.pack)
        hays = [
            h for h in all_hays if h.length in lengths and h.dataset in datasets and h.dataset != "read-once"
        ]
        ro_hays = [h for h in all_hays if h.dataset == "read-once"]
        if args.limit:
            for h in hays:
                h.cases = h.cases[: args.limit]
    else:
        ro_hays = []
    emb = embedder_for(args, table)
    from memllm.agents.doc_store import InMemoryChunkStore

    results: dict = {"command": " ".join(sys.argv)}
    if hays is not None:
        hays.sort(key=lambda h: (h.length, datasets.index(h.dataset)))

    def partial(rows, answers):
        say(bench.table(rows))
        if args.out:
            Path(args.out).write_text(
                json.dumps(results | {"rows": rows, "answers": answers, "partial": True})
            )

    if args.snapshot:
        hay = (
            hays or bench.build_all(llm.count_tokens, datasets[:1], lengths[:1], args.questions, args.seed)
        )[0]
        say(f"snapshot check on {hay.dataset} {bench.label(hay.length)} ({hay.tokens} tokens)")
        results["snapshot"] = snapshot_check(args, llm, hay)
        say("snapshot: " + json.dumps({k: v for k, v in results["snapshot"].items() if "answers" not in k}))
        partial([], [])
    if args.read_once:
        n = bench.parse_lengths(args.read_once)[0]
        hay = next((h for h in ro_hays if h.length == n), None) or bench.read_once_haystack(
            llm.count_tokens, n, args.read_once_questions, args.seed
        )
        say(f"read once, ask {len(hay.cases)}: {hay.tokens} tokens")
        results["read_once"] = bench.read_once_ask_many(llm, hay)
        say("read once, ask many: " + json.dumps(results["read_once"]))
        partial([], [])
    if not args.skip_main:
        results["meta"] = bench.environment(llm)
        results |= bench.run(llm, lengths=lengths, modes=modes, datasets=datasets, n_questions=args.questions,
                             seed=args.seed, embedder=emb, log=say, haystacks=hays, on_rows=partial,
                             store_factory=lambda: InMemoryChunkStore(emb))  # fmt: skip
    results.setdefault("meta", bench.environment(llm))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        say(f"wrote {args.out}")
    meta = results["meta"]
    print(f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
          f"transformers {meta['transformers']}, {meta['dtype']}")  # fmt: skip
    if "rows" in results:
        print(bench.table(results["rows"]))
    if "read_once" in results:
        print("read once, ask many:", json.dumps(results["read_once"]))
    if "snapshot" in results:
        snap = {k: v for k, v in results["snapshot"].items() if "answers" not in k}
        print("snapshot:", json.dumps(snap))


if __name__ == "__main__":
    main()
