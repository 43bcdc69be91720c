"""Fake LLMs shared by agent and CLI tests (no torch, deterministic, exact output)."""

from __future__ import annotations

from collections.abc import Iterator


class FakeLLM:
    """Echoes the last user message and how many messages it saw, streamed word by word.

    When the last message carries recalled memory, the echo names the recalled lines, so tests can
    assert exactly what memory reached the prompt. Tokens are whitespace-separated words.
    """

    def __init__(self, trained_len: int = 512) -> None:
        self.calls: list[list[dict[str, str]]] = []
        self.trained_len = trained_len

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def chat_stream(self, messages, *, max_new_tokens=256, temperature=0.0, seed=None) -> Iterator[str]:
        from memllm.agents.chat import FACT_ASK, FACT_ASK_MANY, MEMORY_HEADER

        self.calls.append([dict(m) for m in messages])
        last = messages[-1]["content"]
        recalled = ""
        if last.startswith(MEMORY_HEADER):  # memory placed before the question: "HEADER\nlines\n\nquestion"
            memory, last = last[len(MEMORY_HEADER) :].rsplit("\n\n", 1)
            recalled = memory.strip().replace("\n", " | ")
            for ask in (FACT_ASK, FACT_ASK_MANY):  # the instruction after a question (not echoed)
                last = last.removesuffix("\n" + ask)
        text = f"echo: {last} ({len(messages)} msgs)"
        if recalled:
            text += f" [memory: {recalled}]"
        words = text.split(" ")
        for i, word in enumerate(words[:max_new_tokens]):
            yield word if i == 0 else " " + word

    def chat(self, messages, **kwargs) -> str:
        return "".join(self.chat_stream(messages, **kwargs))
