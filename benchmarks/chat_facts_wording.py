"""Facts told and asked in wordings that no rule, test or benchmark of memllm was written from (issue 18).

As a new user would: one `memllm chat --user` run tells a set's facts (with a little small talk between
them), a later run asks for each, through the CLI with the real default model on the CPU. Two sets of
twenty: `dev` may be looked at to find what the rules miss; `held` is only measured (a rule changed
because of a `held` answer would make it a second `dev`). An answer is right when it contains the value
(case-insensitive).

    PYTHONPATH=. python benchmarks/chat_facts_wording.py [--sets dev,held] [--modes text,hybrid,kv] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# (what the user says, a later question asking for it, the value the answer must hold)
DEV = [
    ("Just so you know, my brother's name is Casimir.", "Remind me what my brother is called?", "Casimir"),
    ("I'm a veterinarian.", "What do I do for work?", "veterinarian"),
    ("We moved to Tromso in August.", "Where do I live now?", "Tromso"),
    ("The code for my bike lock is 2861.", "What's the code for my bike lock?", "2861"),
    ("I'm allergic to penicillin.", "Do I have any allergies?", "penicillin"),
    ("My favourite band is The Cure.", "Which band do I like best?", "Cure"),
    ("Our wedding anniversary is on June 3.", "When is our anniversary?", "June 3"),
    ("Our cat's name is Mochi.", "What's our cat called?", "Mochi"),
    ("I drive an old Saab.", "What do I drive?", "Saab"),
    ("My gym is in Kreuzberg.", "Where is my gym?", "Kreuzberg"),
    ("Hi, I'm Priya.", "Do you remember my name?", "Priya"),
    ("I grew up in Cork.", "Where did I grow up?", "Cork"),
    ("The password for my laptop is tangerine9.", "what was my laptop password", "tangerine9"),
    ("I really love chai, it's my favourite drink.", "What's my favourite drink?", "chai"),
    ("My manager is Idris.", "Who's my manager?", "Idris"),
    ("I play the cello in an amateur orchestra.", "Which instrument do I play?", "cello"),
    ("My flight number is BA283.", "What is my flight number?", "BA283"),
    ("My parents live in Adelaide.", "Where do my parents live?", "Adelaide"),
    ("My best friend is called Tomasz.", "Who is my best friend?", "Tomasz"),
    ("I'm vegetarian.", "Do I eat meat?", "vegetarian"),
]
HELD = [
    ("My grandmother's name is Rosalind.", "What is my grandmother's name?", "Rosalind"),
    ("I work as an electrician.", "What's my profession?", "electrician"),
    ("I live in Ghent.", "Which town do I live in?", "Ghent"),
    ("My safe combination is 40-12-33.", "What is the combination of my safe?", "40-12-33"),
    ("I'm allergic to bee stings.", "What am I allergic to?", "bee stings"),
    ("My favourite season is autumn.", "Which season do I like most?", "autumn"),
    ("My birthday is on November 21.", "When is my birthday?", "November 21"),
    ("My horse is called Juniper.", "What's my horse's name?", "Juniper"),
    ("I ride a Ducati.", "What motorbike do I ride?", "Ducati"),
    ("My office is on the fourth floor.", "Which floor is my office on?", "fourth"),
    ("Please remember that my son's name is Anselm.", "What's my son called?", "Anselm"),
    ("I was born in Valparaiso.", "Where was I born?", "Valparaiso"),
    ("My membership number is 88213.", "Can you remind me of my membership number?", "88213"),
    ("My favourite book is Middlemarch.", "What is my favourite book?", "Middlemarch"),
    ("My accountant is called Mr Osei.", "Who is my accountant?", "Osei"),
    ("I speak Portuguese at home.", "What language do I speak at home?", "Portuguese"),
    ("My car's registration is LK19 XRT.", "What's my car registration?", "LK19 XRT"),
    ("My sister lives in Reykjavik.", "Where does my sister live?", "Reykjavik"),
    ("My doctor's name is Dr Ambrose.", "What's my doctor's name?", "Ambrose"),
    ("I take my coffee black.", "How do I take my coffee?", "black"),
]
SETS = {"dev": DEV, "held": HELD}
SMALL_TALK = ["What a day it has been.", "Anyway, how are you?", "The weather here is grey again."]


def chat(store: str, user: str, mode: str, lines: list[str], max_new_tokens: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "MEMLLM_HOME"}
    cmd = [sys.executable, "-m", "memllm.cli.app", "chat", "--user", user, "--store", store]
    cmd += ["--memory", mode, "--max-new-tokens", str(max_new_tokens), "--json"]
    proc = subprocess.run(
        cmd, input="".join(x + "\n" for x in lines), capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="dev,held")
    ap.add_argument("--modes", default="text")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for name in args.sets.split(","):
        cases = SETS[name]
        for mode in args.modes.split(","):
            store = tempfile.mkdtemp(prefix="facts-wording-")
            told: list[str] = []
            for i, (said, _, _) in enumerate(cases):
                told.append(said)
                if i % 4 == 3:
                    told.append(SMALL_TALK[(i // 4) % len(SMALL_TALK)])
            t0 = time.perf_counter()
            chat(store, "wording", mode, told, args.max_new_tokens)
            answers = chat(store, "wording", mode, [q for _, q, _ in cases], args.max_new_tokens)
            rows = []
            for (said, question, value), a in zip(cases, answers, strict=True):
                ok = value.lower() in a["answer"].lower()
                rows.append(
                    {"said": said, "question": question, "value": value, "answer": a["answer"], "ok": ok}
                )
                if not ok:
                    print(f"{name}/{mode} | {said} | {question} | {a['answer'][:100]!r}", flush=True)
            right = sum(r["ok"] for r in rows)
            secs = round(time.perf_counter() - t0, 1)
            print(f"{name}/{mode}: {right}/{len(rows)} ({secs} s)", flush=True)
            results.append(
                {"set": name, "mode": mode, "right": right, "cases": len(rows), "s": secs, "rows": rows}
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"python": sys.version.split()[0], "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
