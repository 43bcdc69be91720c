"""Which prompt layout lets the default 135M model answer from recalled facts (CPU, greedy).

Ten facts about a user (a code, a name, a city, a date, a preference, ...), each asked back. The
recalled memory is the top-k facts by MiniLM similarity to the question (the same for every layout);
the layouts vary one thing at a time from a base: the system prompt (the model's own default / a
custom one), where the memory goes (before the question in the user's turn / after it / in the system
message), how each fact is written (a short dated fact / plain / the user's raw turn with a time
stamp, as before issue 18 / second person), k, and recent turns placed before the question.

    python benchmarks/chat_prompt_probe.py [--out benchmarks/results/chat_prompt_probe.json]

Prints one line per layout: correct answers out of 10 (the value appears in the answer).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

# (what the user said, the fact as stored, question, value)
FACTS = [
    ("Please remember this: my locker code is 4417.", "My locker code is 4417.", "What is my locker code?", "4417"),
    ("By the way, my sister's name is Ophelia.", "My sister's name is Ophelia.", "What is my sister's name?", "Ophelia"),
    ("I live in Lisbon.", "I live in Lisbon.", "Which city do I live in?", "Lisbon"),
    ("My birthday is on March 14.", "My birthday is on March 14.", "When is my birthday?", "March 14"),
    ("My favourite colour is teal.", "My favourite colour is teal.", "What is my favourite colour?", "teal"),
    ("Oh, and my dog is called Biscuit.", "My dog is called Biscuit.", "What is my dog called?", "Biscuit"),
    ("I work as a beekeeper.", "I work as a beekeeper.", "What is my job?", "beekeeper"),
    ("I am allergic to peanuts.", "I am allergic to peanuts.", "What am I allergic to?", "peanuts"),
    ("I drive a Volvo.", "I drive a Volvo.", "What car do I drive?", "Volvo"),
    ("My wifi password is bluefern42.", "My wifi password is bluefern42.", "What is my wifi password?", "bluefern42"),
]
DAY = "2026-11-28"
FLASH = [
    ("user", "Anyway, how was your weekend?"),
    ("assistant", "It was good, thanks! I read a book and went for a walk. How about you?"),
]


def second_person(text: str) -> str:
    out = text.replace("My ", "Your ").replace("I am ", "You are ").replace("I ", "You ")
    return out.replace(" my ", " your ")


def render(style: str, said: str, fact: str) -> str:
    if style == "dated":
        return f"- {fact} (told on {DAY})"
    if style == "plain":
        return f"- {fact}"
    if style == "second":
        return f"- {second_person(fact)}"
    if style == "second-dated":
        return f"- {second_person(fact)} (told on {DAY})"
    if style == "turns":
        return f"[{DAY} 10:00] user: {said}"
    raise ValueError(style)


def messages(layout: dict, question: str, lines: list[str]) -> list[dict[str, str]]:
    header = layout.get("header", "Facts I told you before:")
    if layout["style"] == "turns":
        header = "From our earlier conversations:"
    memory = header + "\n" + "\n".join(lines)
    msgs: list[dict[str, str]] = []
    system = layout["system"]
    if layout["place"] == "system":
        system = (system + "\n\n" if system else "") + memory
    if system:
        msgs.append({"role": "system", "content": system})
    if layout.get("flash"):
        msgs += [{"role": r, "content": t} for r, t in FLASH]
    if layout["place"] == "before":
        content = f"{memory}\n\n{question}"
    elif layout["place"] == "after":
        content = f"{question}\n\n{memory}"
    else:
        content = question
    msgs.append({"role": "user", "content": content})
    return msgs


BASE = {"system": None, "place": "before", "style": "dated", "k": 3, "flash": False}
OLD_SYSTEM = "You are a helpful assistant. Answer briefly."
LAYOUTS = [
    ("base: default system, before question, dated facts, k=3", {}),
    ("system: custom 'helpful assistant. Answer briefly.'", {"system": OLD_SYSTEM}),
    ("place: after the question", {"place": "after"}),
    ("place: in the system message", {"place": "system"}),
    ("style: plain facts (no date)", {"style": "plain"}),
    ("style: second person", {"style": "second"}),
    ("style: raw turns with time stamps (before issue 18)", {"style": "turns"}),
    ("k=1", {"k": 1}),
    ("k=10 (all facts)", {"k": 10}),
    ("with 2 recent turns before the question", {"flash": True}),
    ("header 'What you know about me:'", {"header": "What you know about me:"}),
    ("before issue 18: custom system, raw turns, 2 recent turns", {"system": OLD_SYSTEM, "style": "turns", "flash": True}),
    ("k=1, second person", {"k": 1, "style": "second"}),
    ("k=1, second person, dated", {"k": 1, "style": "second-dated"}),
    ("k=2, second person", {"k": 2, "style": "second"}),
    ("k=1, second person, dated, 2 recent turns before", {"k": 1, "style": "second-dated", "flash": True}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated layout numbers (0-based)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from memllm.llm import MemLLM
    from memllm.memory_stores.embeddings import SentenceTransformerEmbedder

    llm = MemLLM.from_pretrained(args.model, device="cpu")
    emb = SentenceTransformerEmbedder()
    fact_vecs = emb.embed([f for _, f, _, _ in FACTS])
    q_vecs = emb.embed([q for _, _, q, _ in FACTS])
    sims = np.asarray(q_vecs) @ np.asarray(fact_vecs).T
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(LAYOUTS))
    results = []
    for li in chosen:
        name, change = LAYOUTS[li]
        layout = {**BASE, **change}
        t0 = time.perf_counter()
        rows = []
        for qi, (_, _, question, value) in enumerate(FACTS):
            top = sorted(np.argsort(-sims[qi])[: layout["k"]].tolist())  # time order = list order
            lines = [render(layout["style"], FACTS[j][0], FACTS[j][1]) for j in top]
            answer = llm.chat(messages(layout, question, lines), max_new_tokens=args.max_new_tokens)
            rows.append({"question": question, "value": value, "answer": answer, "ok": value.lower() in answer.lower(), "fact_in_prompt": qi in top})
        ok = sum(r["ok"] for r in rows)
        print(f"{li:2d} {ok}/10  {name}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append({"layout": name, "config": layout, "correct": ok, "rows": rows})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "max_new_tokens": args.max_new_tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
