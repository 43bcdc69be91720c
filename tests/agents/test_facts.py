"""Rule-based fact extraction (agents.facts): statements that update a fact, and statements inside a
longer sentence, give the subject under which the newer fact supersedes the older one (issue 18)."""

from __future__ import annotations

import pytest

from memllm.agents.facts import extract_facts


@pytest.mark.parametrize(
    ("said", "subject", "value"),
    [
        ("I now work as a surveyor.", "job", "a surveyor"),
        ("I work as a welder.", "job", "a welder"),
        ("We renamed our dog, my dog is called Felix.", "dog name", "Felix"),
        ("Guess what, I just moved to Tallinn!", "home city", "Tallinn"),
        ("My new locker code is 2834.", "locker code", "2834"),
        ("My favourite colour is ochre now.", "favourite colour", "ochre"),
        ("I currently drive a Skoda.", "car", "Skoda"),
    ],
)
def test_statements_and_updates_give_their_subject(said, subject, value):
    facts = extract_facts(said)
    assert [(f.subject, f.value) for f in facts] == [(subject, value)]


@pytest.mark.parametrize(
    "said",
    [
        "If you ask me, my car is a mess.",  # a hedge anywhere: not a fact
        "Well, what is my locker code?",  # a question
        "Honestly, my day is going great.",  # a moment, not a fact
        "It rained all day, and the bus was late.",
    ],
)
def test_no_fact_in_questions_hedges_and_chitchat(said):
    assert extract_facts(said) == []
