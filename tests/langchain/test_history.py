"""MemllmChatMessageHistory: persistence across store instances, exact order with repeated texts,
interplay with the chat agent's records, isolation and clear."""

from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

from memllm.agents.controller import MemoryController, whitespace_tokens
from memllm.agents.langchain import ChatMemLLM, MemllmChatMessageHistory
from memllm.memory_stores import FaissStore, FakeEmbedder, MemoryRecord
from tests.langchain.fakes import ScriptedLLM

CONVERSATION = [
    SystemMessage("be nice"),
    HumanMessage("hi, I am Ann", name="ann"),
    AIMessage("hello Ann", additional_kwargs={"x": 1}),
    HumanMessage("ok"),
    AIMessage("ok"),  # same text as the human turn before it
    HumanMessage("ok"),  # and again
    ToolMessage("42", tool_call_id="t1"),
]


def open_store(path):
    return FaissStore(path, FakeEmbedder(dim=64))


def test_history_persists_across_instances_and_keeps_exact_order(tmp_path):
    store = open_store(tmp_path / "s")
    history = MemllmChatMessageHistory("ann", store=store)
    history.add_messages(CONVERSATION[:3])
    for message in CONVERSATION[3:]:
        history.add_message(message)
    assert history.messages == CONVERSATION
    store.close()
    reopened = MemllmChatMessageHistory("ann", store=open_store(tmp_path / "s"))  # a new process, say
    assert reopened.messages == CONVERSATION
    records = reopened.store.list("user:ann")
    assert [r.text for r in records] == [m.content for m in CONVERSATION]  # turns are events: one each
    assert [r.metadata["role"] for r in records] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "tool",
    ]


def test_sessions_are_isolated_and_clear_forgets_only_turns(tmp_path):
    store = open_store(tmp_path / "s")
    ann = MemllmChatMessageHistory("ann", store=store)
    bob = MemllmChatMessageHistory("bob", store=store)
    ann.add_messages([HumanMessage("my cat is Tom")])
    bob.add_messages([HumanMessage("my dog is Rex")])
    store.add(MemoryRecord("Ann is allergic to nuts", namespace="user:ann", kind="fact"))
    assert ann.messages == [HumanMessage("my cat is Tom")]
    assert bob.messages == [HumanMessage("my dog is Rex")]
    ann.clear()
    assert ann.messages == []
    assert [r.text for r in store.list("user:ann")] == ["Ann is allergic to nuts"]
    assert bob.messages == [HumanMessage("my dog is Rex")]
    custom = MemllmChatMessageHistory("x", store=store, namespace="team")
    custom.add_message(HumanMessage("standup at 9"))
    assert store.list("team")[0].text == "standup at 9"


def test_history_and_memllm_agents_share_one_memory(tmp_path):
    store = open_store(tmp_path / "s")
    # Turns the chat agent stored (role metadata only) read back as messages...
    chat = ChatMemLLM(llm=ScriptedLLM(), memory="text", user="cy", store=store)
    chat.invoke("my bike is red")
    history = MemllmChatMessageHistory("cy", store=store)
    assert history.messages == [HumanMessage("my bike is red"), AIMessage("echo: my bike is red")]
    # ...and what the history stores, the controller recalls, with its role.
    history.add_messages([HumanMessage("my boat is called Wave"), AIMessage("nice name")])
    controller = MemoryController(store, "user:cy", count_tokens=whitespace_tokens)
    flash = controller.flash(100)
    assert [(r.metadata["role"], r.text) for r in flash][-2:] == [
        ("user", "my boat is called Wave"),
        ("assistant", "nice name"),
    ]
    assert history.messages[-1] == AIMessage("nice name")


def test_runnable_with_message_history_remembers_across_calls(tmp_path):
    store = open_store(tmp_path / "s")
    llm = ScriptedLLM()
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{question}")])
    chain = RunnableWithMessageHistory(
        prompt | ChatMemLLM(llm=llm),
        lambda session_id: MemllmChatMessageHistory(session_id, store=store),
        input_messages_key="question",
        history_messages_key="history",
    )
    config = {"configurable": {"session_id": "dee"}}
    chain.invoke({"question": "I have a parrot"}, config=config)
    chain.invoke({"question": "what pet do I have?"}, config=config)
    assert llm.calls[-1]["messages"] == [
        {"role": "user", "content": "I have a parrot"},
        {"role": "assistant", "content": "echo: I have a parrot"},
        {"role": "user", "content": "what pet do I have?"},
    ]


class TextDedupStore:
    """A MemoryStore that keeps one record per text (the protocol allows a store to return an
    existing record's id for a record it already holds)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def add_many(self, records):
        ids = []
        for record in records:
            same = [r for r in self.inner.list(record.namespace) if r.text == record.text]
            ids.append(same[0].id if same else self.inner.add(record))
        return ids


def test_history_keeps_every_message_over_a_store_that_dedups_texts(tmp_path):
    store = TextDedupStore(open_store(tmp_path / "s"))
    history = MemllmChatMessageHistory("gus", store=store)
    said = [HumanMessage("ok"), AIMessage("ok"), HumanMessage("fine"), HumanMessage("ok")]
    history.add_messages(said[:2])
    history.add_messages(said[2:])
    assert [r.text for r in store.list("user:gus")] == ["ok", "fine"]
    assert history.messages == said
