"""How the default 135M model answers a question about the user from the one fact recalled for it
(issue 18, "knowledge updates"): thirty statements and questions of varied wording written for this probe
(not the recall benchmark's templates), the fact extracted from the statement as the chat stores it
(agents.facts), rendered as the chat renders it (agents.controller.render_record), and asked under a few
prompt variants. Prints each wrong answer and the count per variant; --out writes every answer.

    PYTHONPATH=. python benchmarks/chat_fact_answer_probe.py [--only now,prefix] [--out FILE]

Variants: "now" (the chat's layout before this probe: the fact before the question, the model's own
default system prompt); "system" (a system prompt saying the facts are the user's and to answer from
them); "short" (an instruction after the question: answer from the fact in one short sentence);
"prefix" (the chat's layout, the answer started with the fact told back up to its value when the
question asks for the fact's subject: agents.fact_answer; otherwise "now"); "told" (no model: the fact
told back in the second person when the question asks for its subject; otherwise "now"'s answer).
"""

from __future__ import annotations

import argparse
import json
import time

from memllm.agents.chat import MEMORY_HEADER
from memllm.agents.controller import render_record
from memllm.agents.fact_answer import answer_start, asked_fact
from memllm.agents.facts import extract_facts, second_person
from memllm.memory_stores.records import MemoryRecord

# (what the user said, a question asking for it, the value the answer must hold)
CASES = [
    ("Guess what, I relocated to Porto last spring.", "Where am I living these days?", "Porto"),
    ("My favorite color is mustard.", "Do you remember my favorite color?", "mustard"),
    ("My gate code is 7731.", "Remind me of my gate code.", "7731"),
    ("I work at Siemens.", "Where do I work?", "Siemens"),
    ("My daughter's name is Wilhelmina.", "What's my daughter called?", "Wilhelmina"),
    ("My cat is named Pickles.", "What's the name of my cat?", "Pickles"),
    ("I drive a Hyundai Kona.", "Which car do I have?", "Hyundai"),
    ("My email is jo.tan@posteo.de.", "What email address did I give you?", "jo.tan@posteo.de"),
    ("My passport number is X4419203.", "Can you tell me my passport number?", "X4419203"),
    ("My favourite film is Paddington 2.", "Which film is my favourite?", "Paddington"),
    ("My mother lives in Galway.", "Where does my mother live?", "Galway"),
    ("I keep my passport in the top drawer.", "Where did I put my passport?", "top drawer"),
    ("I am allergic to shellfish.", "Is there anything I'm allergic to?", "shellfish"),
    ("I was born in Nagoya.", "What's my birthplace?", "Nagoya"),
    ("My birthday is on July 9.", "When's my birthday?", "July 9"),
    ("My partner is called Ezra.", "Who is my partner?", "Ezra"),
    ("My doctor is Dr Feldman.", "Who's my doctor?", "Feldman"),
    ("My garage PIN is 5160.", "What is the PIN for my garage?", "5160"),
    ("My landlord is called Mrs Abara.", "What's my landlord's name?", "Abara"),
    ("I'm 34 years old.", "How old am I?", "34"),
    ("My favourite author is Ursula Le Guin.", "Who is my favourite writer?", "Le Guin"),
    ("My team at work is called Falcon.", "What's my team called?", "Falcon"),
    ("My blood type is O negative.", "What blood type do I have?", "O negative"),
    ("My licence plate is KX21 ABC.", "what's my license plate", "KX21 ABC"),
    ("My son's school is Greenfield Primary.", "Which school does my son go to?", "Greenfield"),
    ("My favourite dessert is tiramisu these days.", "Tell me my favourite dessert.", "tiramisu"),
    ("My go-to coffee order is a flat white.", "What's my usual coffee order?", "flat white"),
    ("My neighbour is called Bartholomew.", "Do you know my neighbour's name?", "Bartholomew"),
    ("My hotel room number is 412.", "Which room am I in at the hotel?", "412"),
    ("My username is gravel_fox.", "what username do i use", "gravel_fox"),
]
SYSTEM = (
    "You are a personal assistant. The facts below are what the user told you about themselves; "
    "answer the user's questions about themselves from them."
)
TOLD_AT = 1764547200.0  # 2025-12-01


def fact_record(said: str) -> MemoryRecord:
    fact = extract_facts(said)[0]
    meta = {"subject": fact.subject, "value": fact.value, "valid_from": TOLD_AT, "valid_to": None}
    return MemoryRecord(fact.text, namespace="user:probe", kind="fact", created_at=TOLD_AT, metadata=meta)


def ask(llm, variant: str, record: MemoryRecord, question: str, max_new_tokens: int) -> str:
    """variant: "prompt[/nodate][/start]"; prompt now|system|short, start prefix|value|told (see above)."""
    prompt, *rest = variant.split("/")
    start = next((r for r in rest if r in ("prefix", "value", "told")), "")
    line = render_record(record, "raw")
    if "nodate" in rest:
        line = f"- {second_person(record.text)}"
    content = f"{MEMORY_HEADER}\n{line}\n\n{question}"
    if prompt == "short":
        content += "\nAnswer from the fact above in one short sentence."
    msgs = [{"role": "user", "content": content}]
    if prompt == "system":
        msgs = [{"role": "system", "content": SYSTEM}, *msgs]
    asked = asked_fact(question, [record])
    if asked is not None and start == "told":
        return second_person(asked.text)
    if asked is not None and start == "value":  # the fact told back through its value; the model goes on
        return llm.chat(msgs, max_new_tokens=max_new_tokens, answer_prefix=answer_start(asked) or "")
    if asked is not None and start == "prefix":  # the fact told back up to its value: the model writes it
        head = second_person(asked.text[: asked.text.find(asked.metadata["value"])]).rstrip()
        return llm.chat(msgs, max_new_tokens=max_new_tokens, answer_prefix=head)
    return llm.chat(msgs, max_new_tokens=max_new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--only", default="now,system,short,now/prefix,now/told")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from memllm.llm import MemLLM

    llm = MemLLM.from_pretrained(args.model, device="cpu")
    rows = []
    right: dict[str, int] = {}
    for said, question, value in CASES:
        record = fact_record(said)
        row = {"said": said, "fact": record.text, "subject": record.metadata["subject"], "question": question,
               "value": value, "asked": asked_fact(question, [record]) is not None}  # fmt: skip
        for variant in args.only.split(","):
            t0 = time.perf_counter()
            answer = ask(llm, variant, record, question, args.max_new_tokens)
            ok = value.lower() in answer.lower()
            right[variant] = right.get(variant, 0) + ok
            row[variant] = {"answer": answer, "ok": ok, "s": round(time.perf_counter() - t0, 2)}
            if not ok:
                print(f"{variant:7} | {question} | {value} | {answer[:90]!r}", flush=True)
        rows.append(row)
    for variant, n in right.items():
        print(f"{variant}: {n}/{len(CASES)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "right": right, "cases": len(CASES), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
