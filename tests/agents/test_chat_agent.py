"""ChatAgent and the memory CLI with a fake LLM and a fake embedder: exact transcripts, budgets, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memllm.agents.chat import FACT_ASK, ChatAgent, user_namespace
from memllm.agents.controller import ControllerConfig
from memllm.cli.app import app
from memllm.errors import ConfigError
from memllm.memory_stores.embeddings import FakeEmbedder
from memllm.memory_stores.faiss_store import FaissStore
from tests.fakes import FakeLLM

runner = CliRunner()


@pytest.fixture
def store(tmp_path):
    s = FaissStore(tmp_path / "store", FakeEmbedder())
    yield s
    s.close()


def small_budgets() -> ControllerConfig:
    return ControllerConfig(memory_tokens=40, flash_tokens=30, gate="heuristic")


def test_fact_recalled_after_filler_and_across_agents(store):
    llm = FakeLLM(trained_len=200)
    agent = ChatAgent(llm, store, user="alice", controller=small_budgets(), summarize=False)
    assert agent.chat("my dog is called Rex") == "echo: my dog is called Rex (1 msgs)"  # no system message
    for i in range(30):
        agent.chat(f"filler number {i} about the weather today")
    # The fact left the recent turns long ago; the cue "my dog" opens the gate and recall finds it.
    answer = agent.chat("what is my dog called?")
    assert answer.startswith("echo: what is my dog called? (")
    assert "[memory: " in answer
    assert "- Your dog is called Rex. (told on " in answer  # the extracted fact, dated, told back to the user
    recall = agent.last_recall()
    assert recall.gate.fire and recall.memory_tokens <= 40 and recall.flash_tokens <= 30
    assert any(it.record.text == "My dog is called Rex." and it.mode == "raw" for it in recall.used)
    fact = next(it.record for it in recall.used if it.record.kind == "fact")
    assert fact.metadata["subject"] == "dog name" and fact.metadata["value"] == "Rex"
    assert store.get(fact.metadata["evidence"]).text == "my dog is called Rex"  # the turn it came from
    # A new agent over the same store (a restart) remembers too; another user does not.
    again = ChatAgent(llm, store, user="alice", controller=small_budgets(), summarize=False)
    assert "Your dog is called Rex" in again.chat("remember my dog?")
    bob = ChatAgent(llm, store, user="bob", controller=small_budgets(), summarize=False)
    assert "Rex" not in bob.chat("what is my dog called?")


def test_every_turn_is_stored_in_the_users_namespace(store):
    agent = ChatAgent(FakeLLM(), store, user="carol", summarize=False)
    agent.chat("hello")
    agent.chat("second")
    turns = agent.history()
    assert [(r.metadata["role"], r.text) for r in turns] == [
        ("user", "hello"),
        ("assistant", "echo: hello (1 msgs)"),
        ("user", "second"),
        ("assistant", "echo: second (3 msgs)"),
    ]
    assert all(r.namespace == user_namespace("carol") for r in turns)


def test_prompt_never_exceeds_window_with_real_tokenizer(tmp_path, store):
    from memllm.llm import MemLLM
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf

    llm = MemLLM.from_pretrained(str(write_tiny_llama_gguf(tmp_path / "t.gguf")), device="cpu")
    seen: list[int] = []
    original = llm.chat_ids

    def spy(messages, max_new_tokens):
        ids = original(messages, max_new_tokens)
        seen.append(len(ids) + max_new_tokens)
        return ids

    llm.chat_ids = spy
    agent = ChatAgent(llm, store, user="dave", max_new_tokens=8, summarize=False)
    for i in range(12):
        agent.chat(f"turn {i}: the the the there here is some longer text to fill the window quickly")
    assert seen and max(seen) <= llm.trained_len == 256
    assert torch.is_tensor(llm.model.lm_head.weight)


def test_bad_mode_and_user():
    with pytest.raises(ConfigError, match="memory mode must be one of text, kv, hybrid"):
        ChatAgent(FakeLLM(), None, memory="both")
    with pytest.raises(ConfigError, match="user name must be non-empty"):
        user_namespace("  ")


@pytest.fixture
def cli_fakes(monkeypatch):
    fake = FakeLLM()
    monkeypatch.setattr("memllm.cli.common.load_llm", lambda model, device, dtype=None: fake)
    monkeypatch.setattr("memllm.cli.common.load_embedder", lambda: FakeEmbedder())
    return fake


def test_cli_remembers_across_runs_and_memory_commands(cli_fakes, tmp_path):
    st = str(tmp_path / "mem")
    first = runner.invoke(app, ["chat", "--user", "alice", "--store", st], input="my cat is Tom\n")
    assert first.exit_code == 0, first.output
    assert first.stdout == "echo: my cat is Tom (1 msgs)\n"
    second = runner.invoke(
        app, ["chat", "--user", "alice", "--store", st, "--json"], input="what is my cat called?\n/memory\n"
    )
    assert second.exit_code == 0, second.output
    lines = second.stdout.splitlines()
    answer = json.loads(lines[0])["answer"]
    # A new run is a new conversation: the previous run's turns are not put in front as recent turns;
    # the fact "my cat is Tom" is recalled, alone, in the second person: 1 message, no system message.
    assert answer.startswith("echo: what is my cat called? (1 msgs) [memory: - Your cat is Tom. (told on ")
    assert answer.count("(told on ") == 1 and "] user:" not in answer
    report = json.loads(lines[1])
    assert report["query"] == "what is my cat called?" and report["gate"]["fire"] is True

    listed = json.loads(
        runner.invoke(app, ["memory", "list", "--user", "alice", "--store", st, "--json"]).stdout
    )
    assert listed["count"] == 5  # 4 turns and 1 fact
    assert [r["text"] for r in listed["records"]][:3] == [
        "my cat is Tom",
        "My cat is Tom.",
        "echo: my cat is Tom (1 msgs)",
    ]
    found = json.loads(
        runner.invoke(app, ["memory", "search", "cat Tom", "--user", "alice", "--store", st, "--json"]).stdout
    )
    assert {r["text"] for r in found["results"][:2]} == {"my cat is Tom", "My cat is Tom."}
    rid = listed["records"][0]["id"]
    shown = json.loads(
        runner.invoke(app, ["memory", "show", rid[:8], "--user", "alice", "--store", st, "--json"]).stdout
    )
    assert shown["id"] == rid
    exported = runner.invoke(app, ["memory", "export", "-", "--user", "alice", "--store", st])
    assert len(exported.stdout.splitlines()) == 5
    other = runner.invoke(app, ["memory", "list", "--user", "bob", "--store", st, "--json"])
    assert json.loads(other.stdout)["count"] == 0
    gone = runner.invoke(app, ["memory", "forget", rid[:8], "--user", "alice", "--store", st])
    assert gone.stdout == "forgot 1 record(s) of alice\n"
    after = runner.invoke(app, ["memory", "search", "cat Tom", "--user", "alice", "--store", st, "--json"])
    assert all(r["id"] != rid for r in json.loads(after.stdout)["results"])
    exp_file = tmp_path / "alice.jsonl"
    exported = runner.invoke(app, ["memory", "export", str(exp_file), "--user", "alice", "--store", st])
    assert exported.stdout == f"exported 4 record(s) of alice to {exp_file}\n"
    imported = runner.invoke(
        app, ["memory", "import", str(exp_file), "--user", "erin", "--store", st, "--json"]
    )
    assert json.loads(imported.stdout) == {"imported": 4}
    again = runner.invoke(app, ["memory", "import", str(exp_file), "--user", "erin", "--store", st])
    assert again.stdout == "imported 0 record(s) for erin (4 already there)\n"  # honest counts
    wiped = runner.invoke(app, ["memory", "forget", "--all", "--user", "alice", "--store", st, "--json"])
    assert json.loads(wiped.stdout)["forgotten"] == 4


def test_cli_memory_errors_are_one_line(cli_fakes, tmp_path):
    st = str(tmp_path / "mem")
    res = runner.invoke(app, ["memory", "show", "zzz", "--user", "alice", "--store", st])
    assert res.exit_code == 6
    assert (
        res.stderr
        == "error: no memory record with id 'zzz' for 'user:alice': list ids with `memllm memory list`\n"
    )
    res = runner.invoke(app, ["memory", "forget", "--user", "alice", "--store", st])
    assert res.exit_code == 2
    res = runner.invoke(app, ["chat", "--user", "alice", "--store", st, "--memory", "both"], input="hi\n")
    assert res.exit_code == 2
    assert res.stderr == "error: memory mode must be one of text, kv, hybrid, got 'both'\n"


def test_plain_chat_memory_command_says_off(cli_fakes):
    res = runner.invoke(app, ["chat"], input="/memory\n")
    assert res.stdout == "(memory is off: start with --user NAME to remember across runs)\n"


def tiny_context():
    from memllm.config import MemoryConfig

    return MemoryConfig(
        n_init=4, n_local=64, block_size=16, repr_topk=2, topk=2, exc_block_size=16, chunk_size=32
    )


def kv_agent(llm, store, user, mode, max_new_tokens=4, kv_answers=False, stream_with_facts=False):
    return ChatAgent(
        llm,
        store,
        user=user,
        memory=mode,
        max_new_tokens=max_new_tokens,
        summarize=False,
        context_memory=tiny_context(),
        kv_answers=kv_answers,
        stream_with_facts=stream_with_facts,
    )


@pytest.mark.parametrize("mode", ["kv", "hybrid"])
def test_kv_modes_stream_the_dialogue_and_persist(tiny_llm, store, mode):
    agent = kv_agent(tiny_llm, store, "kim", mode)
    agent.chat("hello the there")
    seen_after_one = agent.session.cache.seen_tokens
    agent.chat("and the second the turn")
    seen = agent.session.cache.seen_tokens
    assert seen > seen_after_one > 0
    # The stream holds both turns in chat-template form, the system prompt once.
    assert len(agent.history()) == 4
    logits = agent.session.last_logits.clone()
    agent.close()
    again = kv_agent(tiny_llm, store, "kim", mode)
    assert again.session.cache.seen_tokens == seen
    assert torch.allclose(again.session.last_logits, logits, atol=1e-5)
    other = kv_agent(tiny_llm, store, "lee", mode)
    assert other.session.cache.seen_tokens == 0


@pytest.mark.parametrize("selector", ["hybrid", "lexical", "question"])
def test_the_kv_session_indexes_its_units_with_the_stores_embedder_for_every_text_selector(tiny_llm, store, selector):
    from dataclasses import replace

    agent = ChatAgent(tiny_llm, store, user="kim", memory="kv", max_new_tokens=2, summarize=False,
                      context_memory=replace(tiny_context(), selector=selector))  # fmt: skip
    index = agent.session.text_index
    if selector == "question":  # reads no text index
        assert index is None
    else:
        assert index is not None and index.embedder is store.embedder
    agent.close()


def test_the_kv_selection_matches_the_users_words_not_the_turns_template(tiny_llm, store):
    from dataclasses import replace

    agent = ChatAgent(tiny_llm, store, user="kim", memory="kv", max_new_tokens=2, summarize=False,
                      context_memory=replace(tiny_context(), selector="lexical"))  # fmt: skip
    queries = []
    select_prompt = agent.session.select_prompt

    def spy(ids, oracle_spans=None, selector=None, query=None):
        queries.append(query)
        return select_prompt(ids, oracle_spans, selector, query)

    agent.session.select_prompt = spy
    agent.chat("  where is the red box  ")
    assert queries == ["where is the red box"]
    agent.close()


def test_kv_segment_renders_system_once(tiny_llm, store):
    # No system prompt given: the template's own (this tiny one writes none) and nothing else.
    agent = kv_agent(tiny_llm, store, "sam", "kv", max_new_tokens=2)
    first = agent._segment([{"role": "user", "content": "a"}])
    assert first == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
    agent.chat("a")
    later = agent._segment([{"role": "user", "content": "b"}])
    assert later == "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n"
    # A system prompt given: in the first segment only.
    custom = ChatAgent(
        tiny_llm,
        store,
        user="sue",
        memory="kv",
        system="Be brief.",
        max_new_tokens=2,
        summarize=False,
        context_memory=tiny_context(),
    )
    first = custom._segment([{"role": "user", "content": "a"}])
    assert first.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    custom.chat("a")
    assert custom._segment([{"role": "user", "content": "b"}]) == later


def _answering_with(agent, answer):
    """The session answers `answer` whatever the model would: the turn's tokens and the answer's go
    into the stream as generate() puts them there."""

    def generate(ids, max_new_tokens=32, guard=None, query=None):
        agent.session.feed_ids(ids)
        agent.session.feed(answer)
        yield answer

    agent.session.generate = generate


def test_kv_stream_keeps_no_degenerate_answer(tiny_llm, store):
    # Issue 18: a looping answer left in the kv stream is copied by the model in every later turn
    # (the default model answered "I'm so sorry to hear that." repeated to all ten questions).
    agent = kv_agent(tiny_llm, store, "dot", "kv", kv_answers=True)
    _answering_with(agent, "I'm so sorry to hear that. " * 4)
    agent.chat("I live in Lisbon.")
    assert agent.skipped[0].startswith("repeats itself")
    # The stream holds the user's turn, closed, and nothing of the answer: as if fed alone.
    closed = "<|im_start|>user\nI live in Lisbon.<|im_end|>\n"
    ref = tiny_llm.session(tiny_context())
    ref.feed(closed)
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-5)
    # A fit answer stays, closed as the template closes it.
    _answering_with(agent, "Lisbon is lovely.")
    agent.chat("I drive a Volvo.")
    ref.feed(
        "<|im_start|>user\nI drive a Volvo.<|im_end|>\n<|im_start|>assistant\nLisbon is lovely.<|im_end|>\n"
    )
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-5)
    # Rebuilt from the text memory (repair), the stream is the same.
    agent.repair()
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-4)
    agent.close()


@pytest.mark.parametrize("mode", ["kv", "hybrid"])
def test_kv_stream_keeps_what_the_user_said_and_the_turn_carries_recalled_facts(tiny_llm, store, mode):
    # Issue 18: with the model's answers in the stream the 135M model copied an earlier answer into
    # every later turn (0/10); the question's turn carries the user's recalled fact, as in text mode
    # (read with the stream when stream_with_facts; by default the fact alone answers: the test below).
    agent = kv_agent(tiny_llm, store, "ivy", mode, stream_with_facts=True)
    seen = []

    def generate(ids, max_new_tokens=32, guard=None, query=None):
        seen.append(tiny_llm.tokenizer.decode(ids))
        agent.session.feed_ids(ids)
        agent.session.feed("Noted, 4417.")
        yield "Noted, 4417."

    agent.session.generate = generate
    agent.chat("Please remember this: my locker code is 4417.")
    agent.chat("What is my locker code?")
    # The question's turn: the recalled fact (second person, dated) right before the question.
    assert "Facts I told you before:\n- Your locker code is 4417. (told on " in seen[1]
    assert seen[1].endswith("What is my locker code?<|im_end|>\n<|im_start|>assistant\n")
    assert [it.record.kind for it in agent.last_recall().used] == ["fact"]
    # The stream: the statement as said, closed, no answer and no recalled memory in it; the question
    # not at all (left unanswered there, the model answered it again in place of the next question).
    said = "<|im_start|>user\nPlease remember this: my locker code is 4417.<|im_end|>\n"
    ref = tiny_llm.session(tiny_context())
    ref.feed(said)
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-5)
    # The answers are stored in the text memory all the same, and a rebuild gives the same stream.
    assert [r.metadata["role"] for r in agent.history()] == ["user", "assistant"] * 2
    agent.repair()
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-4)
    agent.close()


@pytest.mark.parametrize("mode", ["kv", "hybrid"])
def test_a_turn_that_recalls_a_fact_is_answered_from_the_fact_not_the_stream(
    tiny_llm, store, mode, monkeypatch
):
    # Issue 18: with ten similar statements in the stream the 135M model copied another one's value
    # ('The answer is: bluefern42' for the colour): a recalled fact answers its turn alone.
    agent = kv_agent(tiny_llm, store, "uma", mode)
    from_stream, from_prompt = [], []

    def generate(ids, max_new_tokens=32, guard=None, query=None):
        from_stream.append(tiny_llm.tokenizer.decode(ids))
        agent.session.feed_ids(ids)
        yield "Nice."

    def chat_stream(messages, **opts):
        from_prompt.append(messages)
        yield "Your locker code is 4417."

    agent.session.generate = generate
    monkeypatch.setattr(tiny_llm, "chat_stream", chat_stream)
    agent.chat("My locker code is 4417.")  # nothing recalled yet: the stream answers
    assert len(from_stream) == 1 and agent.answered_from == "stream"
    assert agent.chat("What is my locker code?") == "Your locker code is 4417."
    assert agent.answered_from == "prompt" and len(from_stream) == 1
    # The prompt is text mode's: the recalled fact right before the question, nothing of the stream.
    ((message,),) = from_prompt  # one message: no system prompt given, no recent turns with memory
    assert message["role"] == "user"
    assert message["content"].startswith("Facts I told you before:\n- Your locker code is 4417. (told on ")
    assert message["content"].endswith("\n\nWhat is my locker code?\n" + FACT_ASK)
    # The stream holds the statement only: the question answered from the fact left nothing in it.
    ref = tiny_llm.session(tiny_context())
    ref.feed("<|im_start|>user\nMy locker code is 4417.<|im_end|>\n")
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-5)
    # A statement that recalls a fact is closed in the stream all the same (what the user said stays).
    agent.chat("My locker code is 2834 now.")
    assert agent.answered_from == "prompt"
    ref.feed("<|im_start|>user\nMy locker code is 2834 now.<|im_end|>\n")
    assert agent.session.cache.seen_tokens == ref.cache.seen_tokens
    assert torch.allclose(agent.session.last_logits, ref.last_logits, atol=1e-5)
    agent.close()


def test_kv_mode_recalls_fact_records_only(tiny_llm, store):
    agent = kv_agent(tiny_llm, store, "jo", "kv")
    assert agent.controller.config.kinds == ("fact",)
    assert kv_agent(tiny_llm, store, "jo2", "hybrid").controller.config.kinds != ("fact",)
    agent.close()


def test_stop_strings_cut_the_answer_and_interrupted_answers_are_not_stored(store):
    agent = ChatAgent(FakeLLM(), store, user="uma", summarize=False)
    pieces = list(agent.stream("one two three", stop=[" three"]))
    assert "".join(pieces) == "echo: one two"
    stream = agent.stream("alpha beta gamma")
    assert next(stream) == "echo:"
    stream.close()  # the caller stops reading: the user's turn is stored, the cut answer is not
    turns = [(r.metadata["role"], r.text) for r in agent.history()]
    assert turns == [
        ("user", "one two three"),
        ("assistant", "echo: one two"),
        ("user", "alpha beta gamma"),
    ]
    assert agent.skipped == ["interrupted"]


def test_degenerate_answers_are_not_stored(store):
    class Looping(FakeLLM):
        def chat_stream(self, messages, **kwargs):
            yield from ["a mix of"] + [" a mix of"] * 20

    agent = ChatAgent(Looping(), store, user="vic", summarize=False)
    agent.chat("tell me about paint")
    assert [r.metadata["role"] for r in agent.history()] == ["user"]
    assert agent.skipped[0].startswith("repeats itself")


def _bytes_under(root) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_forget_all_leaves_nothing_of_the_user_on_disk(cli_fakes, tmp_path):
    from memllm.agents.forget import kv_snapshot_path
    from memllm.memory_stores.faiss_store import FaissStore

    root = tmp_path / "mem"
    st = str(root)
    # Codes long enough not to turn up by chance: the store's files hold some 400 digits of timestamps
    # and ids, where a 4-digit code appeared about one run in 25 (CI failed on one such run).
    for user, said in (("alice", "my locker code is 44170926"), ("bob", "my locker code is 92538813")):
        res = runner.invoke(app, ["chat", "--user", user, "--store", st], input=f"{said}\nhello there\n")
        assert res.exit_code == 0, res.output
    with FaissStore(root) as s:  # KV snapshots where the chat agent keeps them (stand-ins: any files)
        for user in ("alice", "bob"):
            snap = kv_snapshot_path(s, user)
            snap.mkdir(parents=True)
            (snap / "manifest.json").write_text(f'{{"user": "{user}"}}')
            (snap / "state.safetensors").write_bytes(f"kv of {user}".encode())
    assert b"44170926" in _bytes_under(root) and b"alice" in _bytes_under(root)

    res = runner.invoke(app, ["memory", "forget", "--all", "--user", "alice", "--store", st, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["records"] == 5  # 4 turns + 1 fact (index files: those written so far)
    assert report["kv_files"] == ["manifest.json", "state.safetensors"]
    on_disk = _bytes_under(root)
    assert b"alice" not in on_disk and b"44170926" not in on_disk  # no record, name, index or snapshot left
    assert b"92538813" in on_disk and b"kv of bob" in on_disk  # bob's memory is untouched
    listed = runner.invoke(app, ["memory", "list", "--user", "bob", "--store", st, "--json"])
    assert json.loads(listed.stdout)["count"] == 5
    found = runner.invoke(app, ["memory", "search", "locker code", "--user", "bob", "--store", st, "--json"])
    assert any("92538813" in r["text"] for r in json.loads(found.stdout)["results"])
    plain = runner.invoke(app, ["memory", "forget", "--all", "--user", "alice", "--store", st])
    assert plain.stdout.startswith("forgot everything of alice: 0 record(s), 0 index file(s)")


def test_memory_add_supersedes_and_history_shows_both(cli_fakes, tmp_path):
    st = str(tmp_path / "mem")
    first = runner.invoke(app, ["memory", "add", "I live in Lyon.", "--user", "ann", "--store", st, "--json"])
    old = json.loads(first.stdout)["added"][0]
    assert (old["subject"], old["value"], old["superseded"]) == ("home city", "Lyon", [])
    moved = runner.invoke(app, ["chat", "--user", "ann", "--store", st], input="I moved to Oslo.\n")
    assert moved.exit_code == 0, moved.output
    hist = json.loads(
        runner.invoke(app, ["memory", "history", "--user", "ann", "--store", st, "--json"]).stdout
    )
    events = [(c["event"], c["subject"], c["value"]) for c in hist["changes"]]
    assert events == [
        ("added", "home city", "Lyon"),
        ("told", "home city", "Oslo"),
        ("superseded", "home city", "Lyon"),
    ]
    told, ended = hist["changes"][1], hist["changes"][2]
    assert ended["by"] == told["record"] and told["turn"] is not None  # by which fact, from which turn
    answer = runner.invoke(app, ["chat", "--user", "ann", "--store", st], input="where do i live?\n")
    assert "You live in Oslo." in answer.stdout and "Lyon" not in answer.stdout  # only the current fact
    shown = runner.invoke(app, ["memory", "show", old["id"][:8], "--user", "ann", "--store", st])
    assert "created_at: 20" in shown.stdout and "'valid_to': '20" in shown.stdout  # readable times
    table = runner.invoke(app, ["memory", "history", "--user", "ann", "--store", st])
    assert "superseded" in table.stdout and "Oslo" in table.stdout
