"""`slow` tier, as a new user would: ten facts told to `memllm chat --user` in one run, each asked in a
later run, with the real default model on the CPU, in each memory mode (issue 18).

The ten facts cover a code, names, a city, a date, a preference, a job, an allergy, a car and a
password; an answer is correct when it contains the value (case-insensitive).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FACTS = [
    ("Please remember this: my locker code is 4417.", "What is my locker code?", "4417"),
    ("By the way, my sister's name is Ophelia.", "What is my sister's name?", "Ophelia"),
    ("I live in Lisbon.", "Which city do I live in?", "Lisbon"),
    ("My birthday is on March 14.", "When is my birthday?", "March 14"),
    ("My favourite colour is teal.", "What is my favourite colour?", "teal"),
    ("Oh, and my dog is called Biscuit.", "What is my dog called?", "Biscuit"),
    ("I work as a beekeeper.", "What is my job?", "beekeeper"),
    ("I am allergic to peanuts.", "What am I allergic to?", "peanuts"),
    ("I drive a Volvo.", "What car do I drive?", "Volvo"),
    ("My wifi password is bluefern42.", "What is my wifi password?", "bluefern42"),
]
NEEDED = {"text": 8, "hybrid": 8, "kv": 6}


def chat(store: str, mode: str, lines: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "MEMLLM_HOME"}
    proc = subprocess.run(
        [sys.executable, "-m", "memllm.cli.app", "chat", "--user", "alice", "--store", store]
        + ["--memory", mode, "--max-new-tokens", "32", "--json"],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def correct(answers: list[dict]) -> list[bool]:
    return [value.lower() in a["answer"].lower() for (_, _, value), a in zip(FACTS, answers, strict=True)]


@pytest.mark.parametrize("mode", ["text", "hybrid", "kv"])
def test_ten_facts_told_in_one_run_are_answered_in_a_later_run(tmp_path, mode):
    store = str(tmp_path / "store")
    told = chat(store, mode, [said for said, _, _ in FACTS])
    assert len(told) == len(FACTS)
    answers = chat(store, mode, [question for _, question, _ in FACTS])
    ok = correct(answers)
    report = [(q, a["answer"], good) for (_, q, _), a, good in zip(FACTS, answers, ok, strict=True)]
    print(f"{mode}: {sum(ok)}/10", *report, sep="\n")
    assert sum(ok) >= NEEDED[mode], report


UPDATES = [  # (told in the first run, changed in a later run, asked in a third run, old, new)
    (
        "I live in Lisbon.",
        "Guess what, I just moved to Tallinn!",
        "Which city do I live in?",
        "Lisbon",
        "Tallinn",
    ),
    ("My locker code is 4417.", "My new locker code is 2834.", "What is my locker code?", "4417", "2834"),
    ("I work as a welder.", "I now work as a surveyor.", "What is my job?", "welder", "surveyor"),
]


def test_a_fact_changed_in_a_later_run_is_answered_new_and_history_shows_both(tmp_path):
    store = str(tmp_path / "store")
    chat(store, "text", [told for told, *_ in UPDATES])
    chat(store, "text", [changed for _, changed, *_ in UPDATES])
    answers = [a["answer"] for a in chat(store, "text", [question for _, _, question, *_ in UPDATES])]
    report = list(zip([q for _, _, q, *_ in UPDATES], answers, strict=True))
    print(*report, sep="\n")
    newest = sum(new.lower() in a.lower() for (*_, new), a in zip(UPDATES, answers, strict=True))
    # Measured 2/3 in two runs (c18, CPU): "What is my job?" was answered as the model's own job ("I'm
    # a data analysis assistant...") with the current fact in the prompt; 3/3 since the answer to a
    # question asking for a fact starts from it (c18u). The old value never comes back.
    assert newest >= 2, report
    assert not any(old.lower() in a.lower() for (*_, old, _), a in zip(UPDATES, answers, strict=True)), report
    history = ["memory", "history", "--user", "alice", "--store", store, "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "memllm.cli.app", *history], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    changes = json.loads(proc.stdout)["changes"]
    for *_, old, new in UPDATES:  # both values, the old one ended when the new one was told
        events = [(c["event"], c["value"].removeprefix("a ")) for c in changes]
        events = [(e, v) for e, v in events if v in (old, new)]
        assert events == [("told", old), ("told", new), ("superseded", old)], events
