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
        # wordings past "my X is Y" (issue 18: chat_facts_wording.py's dev set found them missing)
        ("I'm a physiotherapist.", "job", "physiotherapist"),
        ("I am an accountant at a small firm.", "job", "accountant"),
        ("Hello, I'm Ingrid.", "name", "Ingrid"),
        ("My name's Tobias.", "name", "Tobias"),
        ("We relocated to Bergen last year.", "home city", "Bergen"),
        ("Our rabbit's name is Clover.", "rabbit name", "Clover"),
        ("The PIN of my bank card is 7720.", "bank card pin", "7720"),
        ("Lasagne is my favourite dish.", "favourite dish", "Lasagne"),
        ("I adore jazz, it's my favourite music.", "favourite music", "jazz"),
        ("My grandparents live in Tours.", "grandparents city", "Tours"),
        ("I play the oboe with a quartet.", "instrument", "oboe"),
        ("I'm vegan.", "diet", "vegan"),
        ("My birthday is on June 3.", "birthday", "on June 3"),  # a date keeps its "on June 3"
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
        "I'm a bit tired today.",  # "I'm a ...": no occupation's noun
        "I'm a big fan of jazz.",
        "I'm a quick learner.",  # an -er noun that is no occupation, after another word
        "I'm a junior in college.",
        "I'm a mother of two.",
        "I'm English.",  # "I'm X": a nationality, not a name
        "I'm so tired.",
    ],
)
def test_no_fact_in_questions_hedges_and_chitchat(said):
    assert extract_facts(said) == []


def test_a_fact_is_written_as_a_sentence_of_its_own():
    (parents,) = extract_facts("My parents live in Adelaide.")
    assert parents.text == "My parents live in Adelaide."
    (car,) = extract_facts("I drive an old Saab.")
    assert car.text == "I drive an old Saab."
    (moved,) = extract_facts("We moved to Tromso in August.")
    assert (moved.value, moved.text) == ("Tromso", "I live in Tromso.")
