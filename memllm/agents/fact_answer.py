"""Which of the user's facts a question asks for, and the start of an answer told from it.

`asked_fact("What is my favourite colour?", records)` returns the current fact record whose subject the
question asks for (`favourite colour`), or None; `answer_start(record)` is that fact told back through
its value ("Your favourite colour is teal"), with which the answer starts: the model writes what follows
("."). The 135M model refuses a question about the user's own tastes with the fact in its prompt ("as a
chatbot, I don't have personal preferences"), invents a placeholder for an e-mail address or a password
('youremail@example.com'), and, asked to write the value itself after "Your favourite colour is",
still writes 'not a color' or drops a letter of a code (benchmarks/RESULTS.md, issue 18).

A question asks for a fact when it is a question or a request to recall (a message that states a fact
asks for none), is about the user (I, my, me; our, we, us), names the fact's subject, and asks nothing
else: every word of a subject written from "my X ..." (`sister name`: "sister"; `garage pin`: "garage"
and "pin"), or its last word alone when no other current fact's subject shares it ("when is our
anniversary" for `wedding anniversary`; a favourite also by "like best"), or, for the subjects the rules of agents.facts write themselves (`home city`, `job`, ...), the words
people use to ask for them ("where do I live", "what do I do for a living"); every other word of the
question is one of a question's own ("what", "is", "remind me", "again", ...), so "What should I feed
my dog?" does not ask for `dog name`, nor "Where does my mother live?" for the user's `home city`.
Subjects come from the fact record's metadata (agents.factbook); nothing here knows the wording of a
benchmark. A superseded fact is never answered from.

Knows nothing of models, prompts or stores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from memllm.agents.facts import asks, extract_facts, second_person
from memllm.memory_stores.records import MemoryRecord

# The subjects agents.facts writes itself: what a question asking for each says, and the words it may use.
_FIXED: dict[str, tuple[str, str]] = {
    "name": (r"\bmy name\b|\bwho am i\b|\bwhat am i called\b", "name called am"),
    "home city": (
        r"^(?!.*\bfor a living\b).*\b(?:live|living|reside|based)\b",
        "live living reside based city town home place",
    ),
    "job": (
        r"\b(?:job|occupation|profession|career|employer)\b|\bwhere do i work\b|\bwhat do i do\b|for a living",
        "job work occupation profession career employer living for as",
    ),
    "birthplace": (r"\bwhere\b.*\bborn\b|\bbirth ?place\b|\bplace of birth\b", "born birthplace birth place"),
    "birthday": (r"\bbirthday\b|\bwhen\b.*\bborn\b|\bdate of birth\b", "birthday born birth date on"),
    "hometown": (
        r"\bwhere\b.*\b(?:from|grow up|grew up)\b|\bhome ?town\b",
        "from grow grew up hometown home town originally",
    ),
    "age": (r"\bhow old\b|\bmy age\b", "how old age"),
    "preference": (r"\bprefer\b", "prefer"),
    "allergy": (r"\ballerg", "allergic allergy allergies to anything"),
    "car": (r"\b(?:car|drive|vehicle)\b", "car drive vehicle kind make"),
    "instrument": (r"\binstrument\b|\bwhat do i play\b", "instrument play"),
    "diet": (r"\bdiet\b|\beat meat\b|\bvegetarian\b|\bvegan\b", "diet eat meat vegetarian vegan"),
}
# A "favourite X" is also asked for as the X the user likes best ("which band do I like best").
_FAVOURITE_WORDS = {"like", "love", "best", "most", "prefer", "top", "favourite"}
# Words the rules add to a subject written from "my X ..." ("my dog is called" -> `dog name`): the
# question says them otherwise ("what is my dog called", "where does my sister live", "where is my key").
_SUFFIX_WORDS = {
    "name": {"name", "called", "named", "call", "who"},
    "city": {"city", "town", "live", "lives", "living", "where", "based"},
    "location": {"where", "keep", "put", "left", "leave", "hide", "store", "find", "location"},
}
# The words of a question itself: asking, the user, time, and a few nouns a question adds to a subject
# ("my email address" for `email`). Any other word asks for something else ("should", "feed").
_SCAFFOLD_WORDS = (
    "what whats which who whos whom where wheres when whens is are was were s am do does did i m ve me my mine "
    "you your the a an of for again remind tell remember recall know can could please now currently these "
    "days nowadays still at in to give gave told said say mention mentioned have has had use using go goes "
    "there any this that it exactly right anymore so then just name number code address id our we us"
)
_ABOUT_ME = re.compile(r"\b(?:i|my|me|mine|i'm|i've|our|we|us)\b", re.IGNORECASE)
_REQUEST = re.compile(
    r"^(?:please\s+)?(?:remind me|tell me|do you (?:remember|know|recall)|can you (?:remind|tell)|"
    r"could you (?:remind|tell)|what|which|where|who|when|how old)\b",
    re.IGNORECASE,
)
_SPELLING = [(r"\bfavorite\b", "favourite"), (r"\bcolor\b", "colour"), (r"\blicense\b", "licence")]


def _normal(text: str) -> str:
    s = text.lower().replace("\u2019", "'")
    for pattern, repl in _SPELLING:
        s = re.sub(pattern, repl, s)
    return s


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _words(text: str) -> list[str]:
    return [_stem(w) for w in re.findall(r"[a-z0-9]+", re.sub(r"'s\b", "", _normal(text)))]


_SCAFFOLD = {_stem(w) for w in _SCAFFOLD_WORDS.split()}


@dataclass(frozen=True)
class Question:
    """A message that asks to be told something about the user: its normalised text, its words
    (stemmed) and what it says is the user's ("my X": X)."""

    text: str
    words: frozenset[str]
    owned: frozenset[str]


def asks_something(message: str) -> bool:
    """Whether `message` asks to be told something (a question or a request to recall), and states no
    fact of its own."""
    text = message.strip()
    if not text or extract_facts(text):
        return False
    return asks(text) or bool(_REQUEST.match(text))


def parse_question(message: str) -> Question | None:
    """The question about the user that `message` asks (None: it states something, asks for a reason or
    a manner, or is not about the user)."""
    text = message.strip()
    if not asks_something(text) or re.match(r"^(?:why|how(?! old)\b)", text, re.IGNORECASE):
        return None
    if not _ABOUT_ME.search(text) or len(re.findall(r"[.!?]+(?:\s|$)", text)) > 1:  # one sentence
        return None
    words = _words(text)
    owned = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("my", "our")}
    return Question(_normal(text), frozenset(words), frozenset(owned))


def _level(q: Question, subject: str) -> int:
    """How `q` asks for `subject`: 2 by every word of it, 1 by its last word only ("when is our
    anniversary" for `wedding anniversary`), 0 not (or it asks for something else too)."""
    subj = _normal(subject).strip()
    if subj in _FIXED:
        pattern, allowed = _FIXED[subj]
        own = {_stem(w) for w in allowed.split()}
        if not re.search(pattern, q.text) or not q.owned <= own:
            return 0
        return 2 if q.words <= _SCAFFOLD | own else 0
    parts = _words(subj)
    if not parts:
        return 0
    suffix = _SUFFIX_WORDS.get(parts[-1], set())
    content = parts[:-1] if suffix else parts
    extra = {_stem(w) for w in suffix}
    if content and content[0] == "favourite" and len(content) > 1 and q.words & _FAVOURITE_WORDS:
        content, extra = content[1:], extra | _FAVOURITE_WORDS  # "the band I like best"
    if not content or content[-1] not in q.words or not q.owned <= set(parts):
        return 0
    if not q.words <= _SCAFFOLD | set(parts) | extra:
        return 0
    return 2 if set(content) <= q.words else 1


def asks_for(question: str | Question, subject: str) -> bool:
    """Whether `question` asks for the fact of `subject`, and for nothing else (see the module's note)."""
    q = parse_question(question) if isinstance(question, str) else question
    return q is not None and _level(q, subject) > 0


def asked_fact(question: str, records: Iterable[MemoryRecord]) -> MemoryRecord | None:
    """The first current fact record among `records` whose subject `question` asks for, or None."""
    q = parse_question(question)
    if q is None:
        return None
    by_head: dict[str, MemoryRecord] = {}
    for record in records:
        subject = record.metadata.get("subject")
        current = record.kind == "fact" and record.metadata.get("valid_to") is None
        level = _level(q, subject) if current and isinstance(subject, str) else 0
        if level == 2:
            return record
        if level == 1:
            by_head.setdefault(subject, record)
    # asked by the last word of its subject only: when no other current fact's subject shares it
    return next(iter(by_head.values())) if len(by_head) == 1 else None


def answer_start(record: MemoryRecord) -> str | None:
    """The fact told back to the user through its value ("Your favourite colour is teal"), or None when
    the record's text does not hold its value (then the answer is the model's own)."""
    value = record.metadata.get("value")
    if not isinstance(value, str) or not value:
        return None
    at = record.text.find(value)
    if at <= 0:
        return None
    return f"{second_person(record.text[:at])}{value}".rstrip(" .!")  # the value as the user wrote it


__all__ = ["Question", "answer_start", "asked_fact", "asks_for", "asks_something", "parse_question"]
