"""A question that asks for a recalled fact is answered starting from that fact (issue 18, updates):
which fact a question asks for, the start of the answer, and the chat agent's use of both (fake LLMs)."""

from __future__ import annotations

import pytest

from memllm.agents.chat import FACT_ASK, ChatAgent
from memllm.agents.fact_answer import answer_start, asked_fact, asks_for, asks_something
from memllm.agents.facts import extract_facts
from memllm.errors import ConfigError
from memllm.memory_stores.embeddings import FakeEmbedder
from memllm.memory_stores.faiss_store import FaissStore
from memllm.memory_stores.records import MemoryRecord
from tests.fakes import FakeLLM


def fact(said: str, valid_to: float | None = None) -> MemoryRecord:
    (f,) = extract_facts(said)
    meta = {"subject": f.subject, "value": f.value, "valid_to": valid_to}
    return MemoryRecord(f.text, namespace="user:t", kind="fact", metadata=meta)


@pytest.mark.parametrize(
    ("said", "question"),
    [
        ("My favourite colour is teal.", "Do you remember my favorite color?"),
        ("My favourite colour is teal.", "what's my favourite colour"),
        ("My sister's name is Ophelia.", "What is my sister called?"),
        ("My dog is called Rex.", "Remind me of my dog's name."),
        ("My garage PIN is 5160.", "What is the PIN for my garage?"),
        ("My mother lives in Galway.", "Where does my mother live?"),
        ("I keep my passport in the top drawer.", "Where did I put my passport?"),
        ("I moved to Oslo.", "Where am I living these days?"),
        ("I live in Oslo.", "Which city do I live in?"),
        ("I work as a welder.", "What do I do for a living?"),
        ("I work as a welder.", "What is my job?"),
        ("I was born in Nagoya.", "Where was I born?"),
        ("I'm 34 years old.", "How old am I?"),
        ("I drive a Volvo.", "Which car do I have?"),
        ("I am allergic to peanuts.", "Is there anything I'm allergic to?"),
        ("My email is jo@mail.org.", "What email address did I give you?"),
        ("My username is gravel_fox.", "what username do i use"),
        ("Our cat's name is Mochi.", "What's our cat called?"),  # "our": the user's household
        ("Our wedding anniversary is on June 3.", "When is our anniversary?"),  # by the subject's last word
        ("My favourite season is spring.", "Which season do I like best?"),
        ("I play the cello.", "Which instrument do I play?"),
        ("I'm vegetarian.", "Do I eat meat?"),
        ("I'm a nurse.", "What do I do for work?"),
    ],
)
def test_a_question_naming_the_facts_subject_asks_for_it(said, question):
    assert asks_for(question, fact(said).metadata["subject"])


@pytest.mark.parametrize(
    ("said", "message"),
    [
        ("My dog is called Rex.", "What is my cat called?"),  # another subject
        ("My favourite colour is teal.", "What is my favourite food?"),
        ("My favourite colour is teal.", "What colour is my car?"),  # "favourite" not said
        ("I live in Oslo.", "Where does my mother live?"),  # someone else's home
        ("I work as a welder.", "Where do I live?"),
        ("I live in Oslo.", "What do I do for a living?"),
        ("My favourite colour is teal.", "My favourite colour is ochre now."),  # a statement, not a question
        ("My dog is called Rex.", "Why is my dog called Rex?"),  # asks for a reason, not the value
        ("My dog is called Rex.", "How is your dog?"),  # not about the user
        ("My locker code is 4417.", "What is a locker code?"),
        ("My dog is called Rex.", "What should I feed my dog?"),  # names the subject, asks something else
        ("I work as a welder.", "What do you think of my work?"),
        ("My dog is called Rex.", "My dog is called Rex. What is my dog called?"),  # two sentences
        ("My favourite season is spring.", "Which song do I like best?"),
        ("My bike lock code is 2861.", "What is my garage code?"),  # another thing's code
    ],
)
def test_a_message_that_does_not_ask_for_the_fact_gets_none(said, message):
    assert not asks_for(message, fact(said).metadata["subject"])


def test_asks_something_is_a_question_or_a_request_and_states_nothing():
    assert asks_something("Remind me of my gate code.")
    assert asks_something("what username do i use")
    assert not asks_something("My gate code is 7731.")
    assert not asks_something("Thanks, that is all.")


def test_the_answer_starts_with_the_fact_told_back_through_its_value():
    assert answer_start(fact("My favourite colour is teal.")) == "Your favourite colour is teal"
    assert answer_start(fact("I just moved to Oslo!")) == "You live in Oslo"
    assert answer_start(fact("I'm 34 years old.")) == "You are 34"
    assert answer_start(fact("My favourite film is I, Robot.")) == "Your favourite film is I"  # value as told
    record = fact("My dog is called Rex.")
    record.metadata["value"] = "Biscuit"  # a text that does not hold its value: no start
    assert answer_start(record) is None


def test_a_superseded_fact_is_never_asked_for():
    old, new = fact("I live in Lyon.", valid_to=100.0), fact("I live in Oslo.")
    assert asked_fact("Where do I live?", [old]) is None
    assert asked_fact("Where do I live?", [old, new]) is new


class PrefixLLM(FakeLLM):
    """FakeLLM that takes answer_prefix: the reply is the prefix, then ' <echo>'."""

    def __init__(self) -> None:
        super().__init__()
        self.prefixes: list[str] = []

    def chat_stream(self, messages, *, answer_prefix="", **kwargs):
        self.prefixes.append(answer_prefix)
        if answer_prefix:
            self.calls.append([dict(m) for m in messages])
            yield answer_prefix
            yield " <value>."
            return
        yield from super().chat_stream(messages, **kwargs)


@pytest.fixture
def store(tmp_path):
    s = FaissStore(tmp_path / "store", FakeEmbedder())
    yield s
    s.close()


def test_the_chat_starts_the_answer_from_the_newest_fact_asked_for(store):
    llm = PrefixLLM()
    agent = ChatAgent(llm, store, user="ann", summarize=False)
    agent.chat("My locker code is 4417.")
    agent.chat("My locker code is 2834 now.")  # supersedes 4417; a statement: no start given
    assert llm.prefixes == ["", ""] and agent.answer_fact is None
    later = ChatAgent(llm, store, user="ann", summarize=False)  # a new conversation
    assert later.chat("What is my locker code?") == "Your locker code is 2834 <value>."
    assert llm.prefixes[-1] == "Your locker code is 2834"
    current = store.get(later.answer_fact)
    assert current.metadata["value"] == "2834" and current.metadata["valid_to"] is None
    assert "2834" in llm.calls[-1][-1]["content"] and "4417" not in llm.calls[-1][-1]["content"]
    assert later.chat("What is the weather like?").startswith("echo: ")  # nothing asked of a fact
    assert llm.prefixes[-1] == "" and later.answer_fact is None
    # The answer, prefix included, is what is stored.
    assert later.history()[-3].text == "Your locker code is 2834 <value>."
    assert llm.calls[-2][-1]["content"].endswith("\n\nWhat is my locker code?\n" + FACT_ASK)


def test_an_llm_without_answer_prefix_answers_as_before(store):
    agent = ChatAgent(FakeLLM(), store, user="bo", summarize=False)
    agent.chat("My locker code is 4417.")
    later = ChatAgent(FakeLLM(), store, user="bo", summarize=False)
    assert later.chat("What is my locker code?").startswith(
        "echo: What is my locker code? (1 msgs) [memory: "
    )
    assert later.answer_fact is None


def test_memllm_answer_prefix_is_streamed_first_and_continued_by_the_model(tiny_llm):
    import torch
    from transformers import DynamicCache

    from memllm.generation import generate_ids

    msgs = [{"role": "user", "content": "What is my locker code?"}]
    prefix = "Your locker code is"
    pieces = list(tiny_llm.chat_stream(msgs, max_new_tokens=3, answer_prefix=prefix))
    assert pieces[0] == prefix
    # What follows is the model's greedy continuation of the prompt with the prefix as the reply's start.
    ids = tiny_llm.chat_ids(msgs, 3) + tiny_llm.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    cache = DynamicCache(config=tiny_llm.model.config)
    want = list(generate_ids(tiny_llm.model, torch.tensor([ids]), cache=cache, max_new_tokens=3,
                             stop_ids=tiny_llm.stop_ids()))  # fmt: skip
    assert "".join(pieces[1:]) == tiny_llm.tokenizer.decode(want, skip_special_tokens=True)
    assert tiny_llm.chat(msgs, max_new_tokens=3) == "".join(tiny_llm.chat_stream(msgs, max_new_tokens=3))


def test_a_question_asking_for_a_fact_opens_the_gate_and_ranks_it_first(store):
    from memllm.agents.controller import ControllerConfig, MemoryController, whitespace_tokens
    from memllm.agents.factbook import FactBook

    ns = "user:cy"
    book = FactBook(store, ns)
    book.add(extract_facts("I live in Lyon.")[0], at=1.0)
    book.add(extract_facts("I moved to Oslo.")[0], at=2.0)  # supersedes Lyon
    book.add(extract_facts("My dog is called Rex.")[0], at=3.0)
    chatter = [f"the weather is nice day {i} where living is easy these days" for i in range(20)]
    for i, text in enumerate(chatter):  # turns that share the question's words, the facts do not
        store.add(
            MemoryRecord(text, namespace=ns, kind="turn", created_at=10.0 + i, metadata={"role": "user"})
        )

    def ctl(**cfg):
        config = ControllerConfig(max_records=1, cues=r"(?!)", **cfg)  # no cue word: the gate decides alone
        return MemoryController(store, ns, count_tokens=whitespace_tokens, config=config, clock=lambda: 100.0)

    question = "Where am I living these days?"
    recall = ctl().recall(question)
    assert recall.gate.fire and recall.gate.reason == "asks for the fact 'home city'"
    (used,) = recall.used
    assert used.record.text == "I live in Oslo." and used.record.metadata["valid_to"] is None
    c = ctl()
    c.recall("What do I do for a living?")  # asks for a fact the user never told: not by this rule
    assert c.gate_stats.by_fact == 0
    c.recall(question)
    assert c.gate_stats.by_fact == 1
    # Off: the same question recalls a chatter turn (or nothing), never the fact by its subject.
    off = ctl(asked_facts=False).recall(question)
    assert all(it.record.kind != "fact" for it in off.used)


def test_asked_facts_is_validated():
    from memllm.agents.controller import ControllerConfig
    from memllm.errors import ConfigError

    with pytest.raises(ConfigError, match="asked_facts"):
        ControllerConfig(asked_facts="yes")
    with pytest.raises(ConfigError, match="w_asked"):
        ControllerConfig(w_asked=-1.0)


def test_a_question_by_a_subjects_last_word_only_needs_it_to_be_the_only_one():
    bike, garage = fact("My bike lock code is 2861."), fact("My garage code is 5160.")
    assert asked_fact("What is my bike lock code?", [garage, bike]) is bike
    assert asked_fact("What's my code again?", [bike]) is bike  # one code: it is asked for
    assert asked_fact("What's my code again?", [bike, garage]) is None  # two codes: which one is not said


def test_a_question_about_the_user_recalls_what_no_rule_read_as_a_fact(store):
    from memllm.agents.controller import ControllerConfig, MemoryController, whitespace_tokens
    from memllm.agents.factbook import FactBook

    ns = "user:sq"
    FactBook(store, ns).add(extract_facts("My dog is called Rex.")[0], at=1.0)  # facts exist, none of this
    said = "every childhood summer i spent in brittany"  # no rule reads it as a fact
    store.add(MemoryRecord(said, namespace=ns, kind="turn", created_at=2.0, metadata={"role": "user"}))
    for i in range(10):
        text = f"the weather is nice on day {i}"
        store.add(
            MemoryRecord(text, namespace=ns, kind="turn", created_at=10.0 + i, metadata={"role": "user"})
        )

    def ctl(**cfg):
        config = ControllerConfig(max_records=1, cues=r"(?!)", gate_similarity=0.3, flash_tokens=8, **cfg)
        return MemoryController(store, ns, count_tokens=whitespace_tokens, config=config, clock=lambda: 100.0)

    question = "where did i spend every childhood summer?"
    recall = ctl().recall(question)
    assert recall.gate.fire and "a question about the user" in recall.gate.reason
    assert [it.record.text for it in recall.used] == [said]
    assert not ctl(self_questions=False).recall(question).gate.fire  # the fact gate alone stays shut
    assert not ctl().recall("where did you spend every childhood summer?").gate.fire  # not about the user
    with pytest.raises(ConfigError, match="self_questions"):
        ControllerConfig(self_questions=1)
