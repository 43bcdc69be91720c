"""LangChain messages <-> chat-template messages, and stop-sequence scanning of a text stream.

`to_chat_messages` turns System/Human/AI/Tool (and generic Chat) messages into the
`{"role", "content"}` dicts that `MemLLM.chat_stream` renders with the model's chat template.
`StopScanner` cuts a stream of text pieces at the first stop sequence, holding back only the text
that could still be the start of one. Knows nothing of models or stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from memllm.errors import InputError
from memllm.generation import StopScanner  # noqa: F401  (re-exported for the adapters)

ROLES: dict[type[BaseMessage], str] = {
    SystemMessage: "system",
    HumanMessage: "user",
    AIMessage: "assistant",
    ToolMessage: "tool",
    FunctionMessage: "tool",
}


def content_text(content: str | list[Any]) -> str:
    """The text of a message content: a string, or the text blocks of a content list joined.

    Non-text blocks (images, audio, files) are refused: memllm's models read text only."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in ("text", "text-plain"):
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
            continue  # a previous answer's reasoning is not replayed to the model
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InputError(
                f"message content block of type {kind!r} is not supported: memllm models read text "
                "only; pass text content (or text blocks)"
            )
    return "".join(parts)


def role_of(message: BaseMessage) -> str:
    """The chat-template role of a message ('system', 'user', 'assistant', 'tool' or a ChatMessage's)."""
    if isinstance(message, ChatMessage):
        return {"human": "user", "ai": "assistant"}.get(message.role, message.role)
    for cls, role in ROLES.items():
        if isinstance(message, cls):
            return role
    raise InputError(
        f"message type {type(message).__name__} is not supported: use System, Human, AI, Tool or Chat messages"
    )


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """Chat-template dicts for LangChain messages. An AI message's tool calls are written out as text
    after its content (the model sees what it asked for); a tool result keeps the tool role."""
    out: list[dict[str, str]] = []
    for message in messages:
        text = content_text(message.content)
        if isinstance(message, AIMessage) and message.tool_calls:
            calls = "\n".join(f"[tool call {c['name']}({c['args']})]" for c in message.tool_calls)
            text = f"{text}\n{calls}" if text else calls
        out.append({"role": role_of(message), "content": text})
    return out
