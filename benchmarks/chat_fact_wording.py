"""How the recalled fact's wording changes the default model's answer (issue 18): the thirty questions of
the update subjects (memllm.bench.recall.UPDATES, each with its second value) and the ten facts of the
slow CLI test, asked in process with one recalled fact line before the question, under three wordings of
the memory section. Prints each wrong answer and the count per wording.

    PYTHONPATH=. python benchmarks/chat_fact_wording.py

Measured (CPU, SmolLM2-135M, c18 merged): as the chat agent words it 19/30, "Facts I told you about myself
before:" 19/30, "Answer from these facts:" before the question 20/30: no change made.
"""

from __future__ import annotations

from memllm import MemLLM
from memllm.agents.chat import MEMORY_HEADER
from memllm.agents.controller import second_person
from memllm.bench.recall import UPDATES
from tests.agents.test_chat_facts_cli import FACTS


def wordings(fact: str, question: str):
    line = f"- {second_person(fact)} (told on 2026-12-01)"
    yield "as now", f"{MEMORY_HEADER}\n{line}\n\n{question}"
    yield "about myself", f"Facts I told you about myself before:\n{line}\n\n{question}"
    yield "answer from", f"{MEMORY_HEADER}\n{line}\n\nAnswer from these facts: {question}"


def main() -> None:
    llm = MemLLM.from_pretrained("smollm2-135m", device="cpu")
    cases = [(later.format(v=vals[1]), q, vals[1]) for _, later, q, vals in UPDATES]
    cases += [(said, q, v) for said, q, v in FACTS]
    right: dict[str, int] = {}
    for fact, question, value in cases:
        for name, message in wordings(fact, question):
            answer = llm.chat([{"role": "user", "content": message}], max_new_tokens=24)
            ok = value.lower() in answer.lower()
            right[name] = right.get(name, 0) + ok
            if not ok:
                print(f"{name} | {question} | {value} | {answer[:80]!r}", flush=True)
    for name, n in right.items():
        print(f"{name}: {n}/{len(cases)}")


if __name__ == "__main__":
    main()
