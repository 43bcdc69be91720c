"""ChatMemLLM beyond the standard suites: stop sequences, usage metadata, message conversion, options,
and memory mode (with a scripted model, so every expected text is exact)."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from memllm.agents.chat import FACT_ASK
from memllm.agents.langchain import ChatMemLLM
from memllm.agents.langchain.messages import StopScanner, to_chat_messages
from memllm.errors import ConfigError, InputError
from memllm.memory_stores import FaissStore, FakeEmbedder
from tests.langchain.conftest import TINY
from tests.langchain.fakes import ScriptedLLM

# ---------------------------------------------------------------------------- stop sequences


def scan(pieces: list[str], stops: list[str]) -> tuple[list[str], str, bool]:
    scanner = StopScanner(stops)
    out: list[str] = []
    for piece in pieces:
        text, done = scanner.push(piece)
        out.append(text)
        if done:
            break
    tail = scanner.flush()
    return out, "".join(out) + tail, scanner.stopped


def test_stop_scanner_cuts_at_first_stop_even_across_pieces():
    out, text, stopped = scan(["Hello wor", "ld. Ob", "serve: x"], ["Observe", "world"])
    assert text == "Hello " and stopped
    assert out == ["Hello ", ""]  # "wor" was held back: it could start "world"


def test_stop_scanner_earliest_stop_wins_and_holds_only_possible_prefixes():
    _, text, _ = scan(["a STOP b END c"], ["END", "STOP"])
    assert text == "a "
    out, text, stopped = scan(["abc S", "T", "x"], ["STOP"])
    assert out == ["abc ", "", "STx"] and text == "abc STx" and not stopped


def test_stop_scanner_without_stops_passes_text_through():
    out, text, stopped = scan(["a", "b"], [])
    assert out == ["a", "b"] and text == "ab" and not stopped


def test_invoke_and_stream_cut_at_stop_and_stop_generating():
    llm = ScriptedLLM(["The answer", " is 4", "2.\nUser:", " more", " text", " never", " read"])
    chat = ChatMemLLM(llm=llm)
    result = chat.invoke("q", stop=["\nUser:"])
    assert result.content == "The answer is 42."
    assert llm.pulled == 3  # generation stopped at the stop sequence, the rest was never generated
    assert result.response_metadata["finish_reason"] == "stop"
    assert result.response_metadata["stop_sequence"] == "\nUser:"
    llm.pulled = 0
    chunks = list(chat.stream("q", stop=["is"]))
    assert "".join(c.content for c in chunks) == "The answer "
    assert chunks[-1].chunk_position == "last" and llm.pulled == 2


def test_instance_stop_applies_and_call_stop_overrides_it():
    llm = ScriptedLLM(["one two ", "three four"])
    chat = ChatMemLLM(llm=llm, stop=["three"])
    assert chat.invoke("q").content == "one two "
    assert chat.invoke("q", stop=["two"]).content == "one "
    assert chat.invoke("q", stop=[]).content == "one two three four"


def test_stop_on_real_model_matches_the_uncut_text(tiny_model):
    chat = ChatMemLLM(model=tiny_model, device="cpu", max_tokens=40)
    full = chat.invoke("Hello").content
    assert len(full) > 4
    stop = full[3:5]
    cut = chat.invoke("Hello", stop=[stop]).content
    assert cut == full[: full.index(stop)]


# ---------------------------------------------------------------------------- usage metadata


def test_usage_metadata_counts_with_the_models_tokenizer(tiny_model):
    chat = ChatMemLLM(model=tiny_model, device="cpu", max_tokens=12)
    llm = chat.get_llm()
    messages = [SystemMessage("Be brief."), HumanMessage("Hello there")]
    result = chat.invoke(messages)
    usage = result.usage_metadata
    prompt = llm.chat_ids(to_chat_messages(messages), 12)
    assert usage["input_tokens"] == len(prompt)
    assert usage["output_tokens"] == llm.count_tokens(result.content)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert result.response_metadata["model_name"] == tiny_model
    streamed = None
    for chunk in chat.stream(messages):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.content == result.content  # greedy: stream and invoke agree
    assert streamed.usage_metadata == usage


def test_max_tokens_bounds_the_reply_and_reports_length(tiny_model):
    chat = ChatMemLLM(model=tiny_model, device="cpu")
    result = chat.invoke("Hello", max_tokens=5)
    assert result.response_metadata["finish_reason"] == "length"
    assert 0 < len(chat.get_llm().tokenizer(result.content, add_special_tokens=False)["input_ids"]) <= 15


def test_async_paths_give_the_same_reply(tiny_model):
    chat = ChatMemLLM(model=tiny_model, device="cpu", max_tokens=10)
    sync = chat.invoke("Hi")

    async def run():
        reply = await chat.ainvoke("Hi")
        pieces = [c.content async for c in chat.astream("Hi")]
        return reply, "".join(pieces)

    reply, streamed = asyncio.run(run())
    assert reply.content == sync.content == streamed
    assert reply.usage_metadata == sync.usage_metadata


# ---------------------------------------------------------------------------- options and messages


def test_call_options_reach_the_model():
    llm = ScriptedLLM(["x"])
    chat = ChatMemLLM(llm=llm, max_tokens=7, temperature=0.3, seed=5)
    chat.invoke("q")
    chat.invoke("q", max_tokens=3, temperature=0.0, seed=1)
    assert [(c["max_new_tokens"], c["temperature"], c["seed"]) for c in llm.calls] == [
        (7, 0.3, 5),
        (3, 0.0, 1),
    ]
    with pytest.raises(ConfigError, match="top_p"):
        chat.invoke("q", top_p=0.9)
    with pytest.raises(ConfigError, match="max_tokens"):
        chat.invoke("q", max_tokens=0)


def test_messages_map_to_chat_template_roles():
    llm = ScriptedLLM(["ok"])
    ChatMemLLM(llm=llm).invoke(
        [
            SystemMessage("sys"),
            HumanMessage([{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}], name="bob"),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1"}]),
            ToolMessage("2", tool_call_id="c1"),
            HumanMessage("thanks"),
        ]
    )
    assert llm.calls[0]["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "[tool call add({'a': 1})]"},
        {"role": "tool", "content": "2"},
        {"role": "user", "content": "thanks"},
    ]


def test_non_text_content_is_refused_with_the_fix():
    chat = ChatMemLLM(llm=ScriptedLLM(["x"]))
    image = {"type": "image", "url": "https://example.com/a.png"}
    with pytest.raises(InputError, match="text only"):
        chat.invoke([HumanMessage([{"type": "text", "text": "what is this"}, image])])


def test_model_loads_lazily_and_names_come_from_llm(tiny_model):
    chat = ChatMemLLM(model=tiny_model, device="cpu")
    assert chat.llm is None  # nothing loaded at construction
    assert chat.get_llm() is chat.get_llm()
    assert ChatMemLLM(llm=ScriptedLLM()).model_name == "scripted"
    assert chat._identifying_params["model_name"] == tiny_model
    assert chat._llm_type == "memllm-chat"


def test_per_call_model_runs_the_other_model(tiny_model):
    chat = ChatMemLLM(model=tiny_model, device="cpu", max_tokens=8)
    other = chat.invoke("Hello", model=TINY["other"])
    assert other.response_metadata["model_name"] == TINY["other"]
    assert other.content != chat.invoke("Hello").content  # different random weights


# ---------------------------------------------------------------------------- memory mode


@pytest.fixture
def store(tmp_path):
    s = FaissStore(tmp_path / "store", FakeEmbedder(dim=64))
    yield s
    s.close()


def test_memory_mode_stores_turns_and_recalls_them_later(store):
    llm = ScriptedLLM()
    chat = ChatMemLLM(llm=llm, memory="text", user="alice", store=store)
    assert chat.invoke("my dog is called Biscuit").content == "echo: my dog is called Biscuit"
    turns = [(r.metadata["role"], r.text) for r in store.list("user:alice", filters={"kind": "turn"})]
    assert turns == [("user", "my dog is called Biscuit"), ("assistant", "echo: my dog is called Biscuit")]
    facts = store.list("user:alice", filters={"kind": "fact"})
    assert [f.metadata["value"] for f in facts] == ["Biscuit"]  # the statement became a fact record
    # A new instance (a new process, say) only gets the new message; the agent recalls the old turn.
    again = ChatMemLLM(llm=llm, memory="text", user="alice", store=store)
    again.invoke([HumanMessage("what is my dog called?")])
    prompt = llm.calls[-1]["messages"]
    assert prompt[-1]["role"] == "user" and prompt[-1]["content"].endswith(
        "what is my dog called?\n" + FACT_ASK
    )
    assert "Biscuit" in prompt[-1]["content"].removesuffix("what is my dog called?")  # recalled fact
    assert again.get_agent().last_recall() is not None


def test_memory_mode_stores_the_turn_cut_at_a_stop(store):
    llm = ScriptedLLM(["Sure.", " END", " hidden"])
    chat = ChatMemLLM(llm=llm, memory="text", user="bob", store=store)
    assert chat.invoke("hello", stop=[" END"]).content == "Sure."
    turns = [(r.metadata["role"], r.text) for r in store.list("user:bob")]
    assert turns == [("user", "hello"), ("assistant", "Sure.")]


def test_memory_mode_uses_system_messages_and_needs_a_human_message(store):
    llm = ScriptedLLM(["ok"])
    chat = ChatMemLLM(llm=llm, memory="text", user="carol", store=store)
    chat.invoke([SystemMessage("You are terse."), HumanMessage("hi")])
    assert llm.calls[-1]["messages"][0] == {"role": "system", "content": "You are terse."}
    chat.invoke("hi again")
    assert llm.calls[-1]["messages"][0]["role"] != "system"  # none given: the model's own default
    with pytest.raises(InputError, match="human message"):
        chat.invoke([AIMessage("hello")])


def test_unknown_memory_mode_is_refused():
    with pytest.raises(ValueError, match="memory"):
        ChatMemLLM(llm=ScriptedLLM(), memory="bogus")


def test_kv_memory_streams_the_dialogue_into_context_memory(store, tiny_model):
    from memllm import MemoryConfig

    small = MemoryConfig(n_init=8, n_local=64, block_size=16, topk=2, exc_block_size=16)
    chat = ChatMemLLM(
        model=tiny_model,
        device="cpu",
        max_tokens=8,
        memory="kv",
        user="erin",
        store=store,
        context_memory=small,
    )
    first = chat.invoke("Hello").content
    assert len(first) >= 2
    seen = chat.get_agent().session.cache.seen_tokens
    assert seen > 0
    reply = chat.invoke("again", stop=[first[1]]).content
    assert first[1] not in reply
    assert chat.get_agent().session.cache.seen_tokens > seen  # the second turn continued the same stream
    said = [r.text for r in store.list("user:erin") if r.metadata["role"] == "user"]
    assert said == ["Hello", "again"]


def test_memory_mode_stores_what_the_caller_read_when_it_stops_early(store):
    llm = ScriptedLLM(["first", " second", " third"])
    chat = ChatMemLLM(llm=llm, memory="text", user="fay", store=store)
    stream = chat.stream("tell me")
    assert next(stream).content == "first"
    stream.close()
    assert llm.pulled == 1
    turns = [(r.metadata["role"], r.text) for r in store.list("user:fay")]
    assert turns == [("user", "tell me")]  # an interrupted answer is not stored as memory
    assert chat.get_agent().skipped == ["interrupted"]
