"""Which recalled fact a question asks for, and the start of an answer told from it.

`asked_fact("What is my favourite colour?", records)` returns the current fact record whose subject the
question asks for (`favourite colour`), or None; `answer_prefix(record)` is that fact told back up to its
value ("Your favourite colour is"), with which the answer starts: the model writes the value and what
follows. The 135M model refuses questions about the user's own tastes with the fact in its prompt ("as a
chatbot, I don't have personal preferences"), and invents a placeholder for an e-mail address or a
password ('youremail@example.com'); an answer started from the fact does neither (benchmarks/RESULTS.md,
issue 18).

A question asks for a fact when it is a question or a request to recall (not a statement: a message
that states a fact asks for none), is about the user (I, my, me), and names the fact's subject: every
word of a subject written from "my X ..." (`sister name`: "sister"; `garage pin`: "garage" and "pin"),
or, for the subjects the rules of agents.facts write themselves (`home city`, `job`, ...), the words
people use to ask for them ("where do I live", "what do I do for a living"). Something else of the
user's named in the question ("where does my mother live" for `home city`) is not the fact's subject.
Subjects come from the fact record's metadata (agents.factbook); nothing here knows the wording of a
benchmark. A superseded fact is never answered from.

Knows nothing of models, prompts or stores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from memllm.agents.facts import asks, extract_facts, second_person
from memllm.memory_stores.records import MemoryRecord

# The subjects agents.facts writes itself: what a question asking for each says.
_FIXED: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "name": r"\bmy name\b|\bwho am i\b|\bwhat am i called\b|\bcall me\b",
        "home city": r"^(?!.*\bfor a living\b).*\b(?:live|living|reside|residing|based|moved|relocated)\b",
        "job": r"\b(?:job|work|works|working|occupation|profession|career|employer)\b|for a living|\bwhat do i do\b",
        "birthplace": r"\bwhere\b.*\bborn\b|\bbirth ?place\b|\bplace of birth\b",
        "birthday": r"\bbirthday\b|\bwhen\b.*\bborn\b|\bdate of birth\b",
        "hometown": r"\bwhere\b.*\b(?:from|grow up|grew up)\b|\bhome ?town\b",
        "age": r"\bhow old\b|\bmy age\b",
        "preference": r"\bprefer",
        "allergy": r"\ballerg",
        "car": r"\b(?:car|drive|vehicle)\b",
    }.items()
}
# Words a question may use with "my" when it asks for one of those subjects ("my job", "my car").
_FIXED_OWN = {
    "name": {"name"},
    "home city": {"home", "city", "town", "address"},
    "job": {"job", "work", "occupation", "profession", "career", "employer"},
    "birthplace": {"birthplace", "birth"},
    "birthday": {"birthday", "birth"},
    "hometown": {"hometown", "home", "town"},
    "age": {"age"},
    "preference": {"preference"},
    "allergy": {"allergy", "allergies"},
    "car": {"car", "vehicle"},
}
# Words the rules add to a subject written from "my X ..." ("my dog is called" -> `dog name`): the
# question says them otherwise ("what is my dog called", "where does my sister live").
_SUFFIXES = {"name", "city", "location"}
_ABOUT_ME = re.compile(r"\b(?:i|my|me|mine|i'm|i've)\b", re.IGNORECASE)
_REQUEST = re.compile(
    r"^(?:please\s+)?(?:remind me|tell me|do you (?:remember|know|recall)|can you (?:remind|tell)|"
    r"could you (?:remind|tell)|what(?:'s| is| was| are)|which|where|who|when|what|how old)\b",
    re.IGNORECASE,
)
_NOT_ASKING = re.compile(r"^\s*(?:why|how(?! old)\b)", re.IGNORECASE)  # a reason or a manner: not the value
_SPELLING = [
    (r"\bfavorite\b", "favourite"),
    (r"\bcolor\b", "colour"),
    (r"\blicense\b", "licence"),
]


def _words(text: str) -> list[str]:
    s = text.lower().replace("\u2019", "'")
    for pattern, repl in _SPELLING:
        s = re.sub(pattern, repl, s)
    s = re.sub(r"'s\b", "", s)
    return re.findall(r"[a-z0-9]+", s)


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def asks_something(message: str) -> bool:
    """Whether `message` asks to be told something (a question or a request to recall), and states
    no fact of its own."""
    text = message.strip()
    if not text or extract_facts(text):
        return False
    return asks(text) or bool(_REQUEST.match(text))


def asks_for(question: str, subject: str) -> bool:
    """Whether `question` asks for the fact of `subject` (see the module's note)."""
    if not asks_something(question) or _NOT_ASKING.match(question) or not _ABOUT_ME.search(question):
        return False
    words = [_stem(w) for w in _words(question)]
    owned = {_stem(words[i + 1]) for i, w in enumerate(words[:-1]) if w == "my"}
    subj = subject.lower().strip()
    if subj in _FIXED:
        own = {_stem(w) for w in _FIXED_OWN[subj]}
        return bool(_FIXED[subj].search(_normal(question))) and owned <= own
    parts = [_stem(w) for w in _words(subj)]
    content = [w for w in parts[:-1] if w] + ([parts[-1]] if parts and parts[-1] not in _SUFFIXES else [])
    if not content or not set(content) <= set(words):
        return False
    return owned <= set(parts)


def _normal(text: str) -> str:
    s = text.lower().replace("\u2019", "'")
    for pattern, repl in _SPELLING:
        s = re.sub(pattern, repl, s)
    return s


def is_current_fact(record: MemoryRecord) -> bool:
    return record.kind == "fact" and record.metadata.get("valid_to") is None


def asked_fact(question: str, records: Iterable[MemoryRecord]) -> MemoryRecord | None:
    """The first current fact record among `records` whose subject `question` asks for, or None."""
    for record in records:
        subject = record.metadata.get("subject")
        if is_current_fact(record) and isinstance(subject, str) and asks_for(question, subject):
            return record
    return None


def answer_prefix(record: MemoryRecord) -> str | None:
    """The fact told back to the user up to its value ("Your favourite colour is"), or None when the
    record's text does not hold its value (then the answer is the model's own)."""
    value = record.metadata.get("value")
    if not isinstance(value, str) or not value:
        return None
    at = record.text.find(value)
    if at <= 0:
        return None
    head = second_person(record.text[:at]).rstrip()
    return head or None


__all__ = ["answer_prefix", "asked_fact", "asks_for", "asks_something"]
