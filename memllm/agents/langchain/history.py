"""MemllmChatMessageHistory: a LangChain chat history persisted in a memllm memory store.

One history is one namespace of the store (by default the ChatAgent's namespace of a user,
`user:<session_id>`), so what a LangChain chain says is recalled by memllm's controller,
retriever and chat agent, and what they stored shows up here. Each message is a record of kind
'turn' (a turn is an event: the same words said twice are two records) whose text is the message's
text and whose metadata holds its role (as the controller expects) and, under 'lc_turns', the exact
LangChain message with the time it was said. Should a store return an existing record for a new
message (a store that keeps one copy per text), the message joins that record's 'lc_turns', so the
history still lists every message, in order.

Knows nothing of models or prompts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    message_to_dict,
    messages_from_dict,
)

from memllm.agents.langchain.messages import role_of, to_chat_messages
from memllm.errors import StoreError
from memllm.memory_stores.records import MemoryRecord

EMPTY_TEXT = "(empty message)"

_clock_lock = threading.Lock()
_last_at = 0.0


def _now() -> float:
    """time.time(), strictly increasing within this process (orders messages added together)."""
    global _last_at
    with _clock_lock:
        _last_at = max(time.time(), _last_at + 1e-6)
        return _last_at


def user_namespace(user: str) -> str:
    """The ChatAgent's namespace of a user (`user:<name>`)."""
    from memllm.agents.chat import user_namespace as agent_namespace

    return agent_namespace(user)


def message_from_record(record: MemoryRecord) -> BaseMessage:
    """A message for a turn record written by another memllm component (no LangChain metadata)."""
    role = record.metadata.get("role", "user")
    if role == "user":
        return HumanMessage(record.text)
    if role == "assistant":
        return AIMessage(record.text)
    if role == "system":
        return SystemMessage(record.text)
    return ChatMessage(role=str(role), content=record.text)


def occurrences(record: MemoryRecord) -> list[tuple[float, BaseMessage]]:
    """(time, message) for every time a turn record's text was said, oldest first."""
    turns = record.metadata.get("lc_turns")
    if not turns:
        return [(record.created_at, message_from_record(record))]
    messages = messages_from_dict([t["message"] for t in turns])
    return [(float(t["at"]), m) for t, m in zip(turns, messages, strict=True)]


class MemllmChatMessageHistory(BaseChatMessageHistory):
    """Chat history of one session/user, persisted in a memllm store.

        history = MemllmChatMessageHistory("alice", store=FaissStore(path, embedder))
        history = MemllmChatMessageHistory("alice", path="~/.cache/memllm/memory")
        RunnableWithMessageHistory(chain, lambda sid: MemllmChatMessageHistory(sid, store=store), ...)

    session_id: the user or session; namespace: the store namespace (default `user:<session_id>`,
    the ChatAgent's). store / path: an open MemoryStore, or where to open the default FaissStore
    (packaged embedder). `clear()` forgets the namespace's turns (its facts and documents stay).
    """

    def __init__(
        self,
        session_id: str,
        *,
        store: Any = None,
        path: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if not session_id and not namespace:
            raise StoreError("MemllmChatMessageHistory needs a session_id (a user or session name)")
        if store is None:
            from memllm.agents.langchain.chat_model import open_default_store

            store = open_default_store(path)
        self.store = store
        self.session_id = session_id
        self.namespace = namespace or user_namespace(session_id)

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Every message of the session, in the order said."""
        said: list[tuple[float, int, BaseMessage]] = []
        for record in self.store.list(self.namespace, filters={"kind": "turn"}):
            said.extend((at, len(said), msg) for at, msg in occurrences(record))
        return [msg for _, _, msg in sorted(said, key=lambda t: (t[0], t[1]))]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Store messages (one record per distinct text; a repeated text gains an occurrence)."""
        messages = list(messages)
        if not messages:
            return
        texts = [m["content"] or EMPTY_TEXT for m in to_chat_messages(messages)]
        said = [{"at": _now(), "message": message_to_dict(m)} for m in messages]
        records = [
            MemoryRecord(
                text,
                namespace=self.namespace,
                kind="turn",
                created_at=turn["at"],
                metadata={"role": role_of(m), "lc_turns": [turn]},
            )
            for text, turn, m in zip(texts, said, messages, strict=True)
        ]
        ids = self.store.add_many(records)
        extra: dict[str, list[dict[str, Any]]] = {}
        for record, rid, turn in zip(records, ids, said, strict=True):
            if rid != record.id:  # the text was stored before (or earlier in this batch)
                extra.setdefault(rid, []).append(turn)
        for rid, turns in extra.items():
            existing = self.store.get(rid)
            if existing is None:  # forgotten meanwhile by another process
                continue
            known = existing.metadata.get("lc_turns") or [
                {"at": at, "message": message_to_dict(m)} for at, m in occurrences(existing)
            ]
            self.store.update(rid, metadata={**existing.metadata, "lc_turns": known + turns})

    def clear(self) -> None:
        """Forget this session's turns (records of kind 'turn' in its namespace)."""
        ids = [r.id for r in self.store.list(self.namespace, filters={"kind": "turn"})]
        if ids:
            self.store.delete(ids)
