"""Rule-based extraction of the user's statements of fact, and how a fact is written for a small model.

`extract_facts("Please remember this: my locker code is 4417.")` returns
`[Fact(subject="locker code", value="4417", text="My locker code is 4417.")]`. A fact's subject is
the key under which a later fact supersedes it ("I moved to Oslo" supersedes "I live in Lyon": both
are `home city`). Rules only: no model call; questions, hedges ("maybe", "if") and chit-chat about
the day are not facts. An LLM extractor for stronger models can replace `extract_facts` (the agent
takes any `str -> list[Fact]`).

Knows nothing of stores, prompts or models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Openers that carry no fact ("Please remember this:", "By the way,", "Oh and").
_OPENERS = re.compile(
    r"^(?:(?:please\s+)?(?:remember|note|keep in mind|don't forget|do not forget)(?:\s+(?:this|that))?\s*[:,-]?\s*"
    r"|(?:by the way|btw|oh|and|also|so|well|fyi|ok(?:ay)?|hey|hi|actually|just so you know)\s*[,:!-]?\s*"
    r"|(?:i\s+(?:want|need)\s+you\s+to\s+(?:remember|know)(?:\s+that)?)\s*[:,-]?\s*)+",
    re.IGNORECASE,
)
# Tails that carry no fact ("..., did I tell you?", "..., always has been", "... these days").
_TAILS = re.compile(
    r"\s*(?:,?\s*(?:did i (?:tell|mention)[^.!?]*|always has been|these days|now|by the way|btw|"
    r"just so you know|for what it'?s worth|if you (?:must|want to) know))+\s*[.!]*$",
    re.IGNORECASE,
)
_HEDGES = re.compile(r"\b(maybe|might|perhaps|if|would|could|should|wish|hope|not sure|probably)\b", re.I)
# Subjects of "my X is Y" that describe a moment, not a fact about the person.
_MOMENT = set(
    "day week weekend morning night evening afternoon life mind point guess bad pleasure fault turn "
    "question answer problem issue head opinion advice plan plans time summer winter break vacation "
    "holiday schedule goal dream heart mood luck situation experience thought thoughts part bet concern "
    "worry hope".split()
)
_STOP_VALUES = {"it", "that", "this", "there", "here", "so", "too", "fine", "ok", "okay", "good", "great"}
_WORD = r"[A-Za-z][\w'-]*"
_VALUE = r"(?P<value>[^,;!?]+?)"
_END = r"\s*(?:[,;].*)?[.!]*$"
_NOW = r"(?:now|currently|still|actually) "  # "I now work as ...": the same fact, updated
# "I'm a/an X": an occupation when X ends as the nouns of occupations do ("veterinarian", "electrician",
# "plumber", "nurse"), and is not a word for a person that is no occupation ("fan", "mother", "runner").
_JOB_NOUN = (
    r"[A-Za-z-]*(?:er|or|ist|ian|ant|ent|eer|ic|man|woman|nurse|chef|cook|pilot|vet|medic|surgeon|"
    r"architect|clerk|judge|tutor|coach|agent|analyst|consultant|officer|student|dentist|poet|artist|"
    r"midwife|barista|carpenter|plumber|mechanic|paramedic|cashier|nanny|lawyer|attorney|farmer)"
)
_NOT_JOB = (
    r"(?:big|huge|great|little|bit|lot|real|true|fan|lover|member|beginner|believer|mother|father|brother|"
    r"sister|daughter|son|parent|mum|mom|dad|grandmother|grandfather|smoker|drinker|winner|loser|loner|"
    r"newcomer|foreigner|stranger|customer|user|player|gamer|reader|runner|swimmer|walker|sucker|"
    r"romantic|introvert|extrovert|perfectionist|optimist|pessimist|vegetarian|vegan|pescatarian|"
    r"morning|night|early|late|person|people|junior|senior|sophomore|freshman|christian|catholic|"
    r"workaholic|alcoholic|diabetic|asthmatic|learner|listener|dreamer|survivor|thinker|talker|eater)"
)
# "I'm Priya": a capitalised word that is not a nationality, faith, diet or state ("I'm English").
_NOT_NAME = (
    r"(?:[A-Z][a-z]+(?:ish|ese)|American|Canadian|Australian|Indian|Italian|Russian|Brazilian|Mexican|"
    r"German|Norwegian|Christian|Catholic|Jewish|Muslim|Hindu|Buddhist|Atheist|Vegan|Vegetarian|Fine|"
    r"Good|Okay|Ok|Back|Here|Home|Sorry|Done|Ready|Happy|Sad|Tired|Busy|Sure|Not|So|Very|Just|Still)"
)
# A place or company after the value ("a nurse at the clinic", "the cello in an orchestra"): not kept.
_PLACE_TAIL = r"(?:\s+(?:at|in|for|with|from|on)\s+[^,;!?]+?)?"
# When a fact became true, after its value ("moved to Oslo in August"): not part of the value.
_WHEN_TAIL = re.compile(
    r"\s+(?:(?:in|since|back in|during|this|last|over the)\s+(?:january|february|march|april|may|june|july|"
    r"august|september|october|november|december|spring|summer|autumn|fall|winter|\d{4}|week|month|year)\b.*"
    r"|(?:recently|yesterday|today|a while ago|\w+ (?:days|weeks|months|years) ago))$",
    re.I,
)
_DATED = re.compile(r"\b(?:birthday|anniversary|date|day|born on|appointment)\b", re.I)
# "The code for my bike lock is ..." is said of "my bike lock code".
_OF_MY = re.compile(
    rf"^the ((?:{_WORD}\s+){{0,2}}{_WORD}) (?:for|of|to|on) (?:my|our) ((?:{_WORD}\s+){{0,2}}{_WORD}) (is|are) ",
    re.I,
)

# (pattern, subject template, text template). Groups: subj (the X of "my X"), value.
_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(rf"^my name(?: is|'s) {_VALUE}{_END}", re.I), "name", "My name is {value}."),
    (re.compile(rf"^(?:i'?m|i am) called {_VALUE}{_END}", re.I), "name", "My name is {value}."),
    (re.compile(rf"^call me {_VALUE}{_END}", re.I), "name", "My name is {value}."),
    (
        re.compile(
            rf"^my (?P<subj>(?:{_WORD}\s+){{0,3}}?{_WORD}) (?:is|are) (?:called|named) {_VALUE}{_END}", re.I
        ),
        "{subj} name",
        "My {subj} is called {value}.",
    ),
    (
        re.compile(
            rf"^my (?P<subj>(?:{_WORD}\s+){{0,3}}?{_WORD}) (?:lives?|works?|is based|are based) in {_VALUE}{_END}",
            re.I,
        ),
        "{subj} city",
        "My {subj} lives in {value}.",
    ),
    (  # "Chai is my favourite drink", "I really love chai, it's my favourite drink"
        re.compile(
            rf"^(?:i (?:really |absolutely |just )?(?:love|like|adore|enjoy) )?(?P<value>[^,;!?]+?),? "
            rf"(?:is|are|it'?s|it is|that'?s|they'?re) my (?P<subj>favou?rite(?:\s+{_WORD}){{1,2}}){_END}",
            re.I,
        ),
        "{subj}",
        "My {subj} is {value}.",
    ),
    (
        re.compile(rf"^my (?P<subj>(?:{_WORD}\s+){{0,3}}?{_WORD}) (?:is|are|was) {_VALUE}{_END}", re.I),
        "{subj}",
        "My {subj} is {value}.",
    ),
    (
        re.compile(rf"^i(?:'ve| have)? (?:just )?(?:live|moved|relocated) (?:in|to) {_VALUE}{_END}", re.I),
        "home city",
        "I live in {value}.",
    ),
    (re.compile(rf"^i (?:{_NOW})?live in {_VALUE}{_END}", re.I), "home city", "I live in {value}."),
    (re.compile(rf"^i was born on {_VALUE}{_END}", re.I), "birthday", "I was born on {value}."),
    (re.compile(rf"^i was born in {_VALUE}{_END}", re.I), "birthplace", "I was born in {value}."),
    (
        re.compile(rf"^i(?:'m| am)? (?:from|grew up in) {_VALUE}{_END}", re.I),
        "hometown",
        "I am from {value}.",
    ),
    (
        re.compile(rf"^i (?:{_NOW})?(?:work|am working) (?:as|at|for) {_VALUE}{_END}", re.I),
        "job",
        "I work as {value}.",
    ),
    (
        re.compile(rf"^i(?:'m| am) a (?P<value>{_WORD}(?:\s+{_WORD})?) by (?:profession|trade){_END}", re.I),
        "job",
        "I work as a {value}.",
    ),
    (  # "I'm a veterinarian", "I am an electrician": an occupation's noun (_JOB_NOUN, not _NOT_JOB)
        re.compile(
            rf"^i(?:'m| am) an? (?P<value>(?:(?!{_NOT_JOB}\b){_WORD}\s+)?(?!{_NOT_JOB}\b){_JOB_NOUN})"
            rf"{_PLACE_TAIL}{_END}",
            re.I,
        ),
        "job",
        "I work as a {value}.",
    ),
    (
        re.compile(r"^i(?:'m| am) (?P<value>\d{1,3}) years? old" + _END, re.I),
        "age",
        "I am {value} years old.",
    ),
    (re.compile(rf"^i (?:prefer|love|like|enjoy) {_VALUE}{_END}", re.I), "preference", "I prefer {value}."),
    (re.compile(rf"^i(?:'m| am) allergic to {_VALUE}{_END}", re.I), "allergy", "I am allergic to {value}."),
    (
        re.compile(r"^i(?:'m| am) (?:an? )?(?:strict )?(?P<value>vegetarian|vegan|pescatarian)" + _END, re.I),
        "diet",
        "I am {value}.",
    ),
    (
        re.compile(rf"^i play the (?P<value>{_WORD}){_PLACE_TAIL}{_END}", re.I),
        "instrument",
        "I play the {value}.",
    ),
    (  # "Hi, I'm Priya": a capitalised name, not _NOT_NAME
        re.compile(rf"^[Ii](?:'m| am) (?!{_NOT_NAME}\b)(?P<value>[A-Z][a-z]+(?: [A-Z][a-z]+)?){_END}"),
        "name",
        "My name is {value}.",
    ),
    (re.compile(rf"^i (?:{_NOW})?drive an? {_VALUE}{_END}", re.I), "car", "I drive a {value}."),
    (
        re.compile(
            rf"^i (?:always |usually )?(?:keep|hide|put|leave|store) my (?P<subj>(?:{_WORD}\s+){{0,2}}?{_WORD}) "
            rf"(?P<value>(?:under|in|at|behind|on|inside|next to|beside) [^,;!?]+?){_END}",
            re.I,
        ),
        "{subj} location",
        "I keep my {subj} {value}.",
    ),
]
_QUESTION = re.compile(
    r"^(?:what|where|who|whom|whose|when|why|how|which|do|does|did|is|are|was|were|can|could|will|would|"
    r"shall|should|have|has|may)\b",
    re.I,
)
_JOINERS = re.compile(r"\s+(?:and|but|because|so|since|though|although|while|which|who)\s+", re.I)


@dataclass(frozen=True)
class Fact:
    """A statement of fact about the user: `subject` (the supersession key), `value`, `text` (a short
    first-person sentence, what is stored and embedded)."""

    subject: str
    value: str
    text: str


def asks(message: str) -> bool:
    """Whether a message is a question (it ends with a question mark)."""
    return message.rstrip().rstrip("\"')").endswith("?")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _clean(sentence: str) -> str:
    s = _OPENERS.sub("", sentence.strip())
    s = re.sub(r"\b(\d{1,2}(?:st|nd|rd|th)?),\s+(\d{4})\b", r"\1 \2", s)  # "March 3, 1990": one value
    s = _TAILS.sub("", s.rstrip("?").rstrip() if _TAILS.search(s) else s)
    s = re.sub(r"^our\b", "my", s.strip(), flags=re.I)  # a household's fact is the user's
    s = re.sub(r"^we(?:'ve| have)? (?=(?:just )?(?:live|moved|relocated)\b)", "i ", s, flags=re.I)
    s = _OF_MY.sub(lambda m: f"my {m.group(2)} {m.group(1)} {m.group(3)} ", s)
    return s.strip().rstrip(".!").strip()


def _norm_subject(subject: str) -> str:
    s = subject.lower().strip()
    s = re.sub(r"\bfavorite\b", "favourite", s)
    s = re.sub(r"\bcolor\b", "colour", s)
    s = re.sub(r"^(?:current|new|old|actual)\s+", "", s)
    s = re.sub(r"'s name$", " name", s)
    return re.sub(r"\s+", " ", s)


def extract_facts(text: str) -> list[Fact]:
    """The facts the user states about themselves in `text` (rules; at most one per sentence)."""
    facts: list[Fact] = []
    for sentence in _sentences(text):
        s = _clean(sentence)
        if not s or _QUESTION.match(s) or _HEDGES.search(s):
            continue
        fact = _match(s)
        for clause in _clauses(s) if fact is None else ():  # "We renamed our dog, my dog is called Rex."
            fact = _match(clause)
            if fact is not None:
                break
        if fact is not None:
            facts.append(fact)
    return facts


def _clauses(sentence: str) -> list[str]:
    """What follows each comma, semicolon or colon of `sentence`, openers removed ("guess what, I just
    moved to Oslo" -> "I just moved to Oslo"), for a statement that does not open the sentence."""
    return [_clean(sentence[m.end() :]) for m in re.finditer(r"[,;:]\s+", sentence)]


def _match(s: str) -> Fact | None:
    """The fact of the first rule that matches the clause `s` (None: no rule, or a value or subject
    that is not a fact)."""
    if not s or _QUESTION.match(s):
        return None
    for pattern, subject_t, text_t in _RULES:
        m = pattern.match(s)
        if m is None:
            continue
        groups = m.groupdict()
        value = _JOINERS.split(groups["value"])[0].strip().strip("\"'").rstrip(".")
        subj = (groups.get("subj") or "").strip()
        if not value or value.lower() in _STOP_VALUES or len(value.split()) > 8:
            return None
        if subj and (subj.lower() in _MOMENT or subj.lower().split()[-1] in _MOMENT):
            return None
        if re.match(r"^(?:going|doing|getting|not|so|very|really|pretty|kind of|kinda)\b", value, re.I):
            return None
        subject = _norm_subject(subject_t.format(subj=subj))
        if not _DATED.search(f"{subject} {text_t}"):
            value = _WHEN_TAIL.sub("", value).strip() or value
        text = text_t.format(subj=subj.lower(), value=value)
        if re.search(r"[^s]s$", subj):  # "my parents live in ..."
            text = text.replace(" lives in ", " live in ")
        text = re.sub(r"\ba (?=[aeiou])", "an ", text, flags=re.I)  # "I drive an old Saab."
        return Fact(subject, value, text)
    return None


_PERSON = [
    (r"\bI am\b", "you are"),
    (r"\bI'm\b", "you're"),
    (r"\bI was\b", "you were"),
    (r"\bI've\b", "you've"),
    (r"\bI'll\b", "you'll"),
    (r"\bI'd\b", "you'd"),
    (r"\bI\b", "you"),
    (r"\bmyself\b", "yourself"),
    (r"\bmine\b", "yours"),
    (r"\bmy\b", "your"),
    (r"\bme\b", "you"),
]


def second_person(text: str) -> str:
    """A user's first-person statement told back to them ("My locker code is 4417." -> "Your locker
    code is 4417."): how the 135M model best uses a recalled fact (benchmarks/RESULTS.md, issue 18)."""
    out = text
    for pattern, repl in _PERSON:
        out = re.sub(pattern, repl, out, flags=re.IGNORECASE)
    return out[:1].upper() + out[1:]


__all__ = ["Fact", "asks", "extract_facts", "second_person"]
