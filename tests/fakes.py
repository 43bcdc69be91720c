"""Fake LLMs shared by agent and CLI tests (no torch, deterministic, exact output)."""

from __future__ import annotations

from collections.abc import Iterator


class FakeLLM:
    """Echoes the last user message and how many messages it saw, streamed word by word.

    When the system message carries recalled memory, the echo names the recalled lines, so tests can
    assert exactly what memory reached the prompt. Tokens are whitespace-separated words.
    """

    def __init__(self, trained_len: int = 512) -> None:
        self.calls: list[list[dict[str, str]]] = []
        self.trained_len = trained_len

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def chat_stream(self, messages, *, max_new_tokens=256, temperature=0.0, seed=None) -> Iterator[str]:
        from memllm.agents.chat import MEMORY_HEADER

        self.calls.append([dict(m) for m in messages])
        text = f"echo: {messages[-1]['content']} ({len(messages)} msgs)"
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        if MEMORY_HEADER in system:
            recalled = system.split(MEMORY_HEADER, 1)[1].strip().replace("\n", " | ")
            text += f" [memory: {recalled}]"
        words = text.split(" ")
        for i, word in enumerate(words[:max_new_tokens]):
            yield word if i == 0 else " " + word

    def chat(self, messages, **kwargs) -> str:
        return "".join(self.chat_stream(messages, **kwargs))
