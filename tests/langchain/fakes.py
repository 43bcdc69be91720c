"""A scripted fake MemLLM for the adapter tests: exact pieces, and a record of what was asked."""

from __future__ import annotations

from collections.abc import Iterator


class ScriptedLLM:
    """Streams `script` (a list of text pieces) for every chat, or, with no script, echoes the last
    message word by word. Tokens are whitespace words. `pulled` counts the pieces the caller took,
    so tests can see that generation stopped early."""

    name = "scripted"

    def __init__(self, script: list[str] | None = None, trained_len: int = 4096) -> None:
        self.script = script
        self.trained_len = trained_len
        self.calls: list[dict] = []
        self.pulled = 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def chat_ids(self, messages, max_new_tokens: int) -> list[int]:
        words = sum(len(f"{m['role']}: {m['content']}".split()) for m in messages)
        return list(range(words))

    def chat_stream(self, messages, *, max_new_tokens=256, temperature=0.0, seed=None) -> Iterator[str]:
        self.calls.append(
            {
                "messages": [dict(m) for m in messages],
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "seed": seed,
            }
        )
        if self.script is not None:
            pieces = self.script
        else:
            words = f"echo: {messages[-1]['content']}".split(" ")
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        for piece in pieces[:max_new_tokens]:
            self.pulled += 1
            yield piece

    def chat(self, messages, **kwargs) -> str:
        return "".join(self.chat_stream(messages, **kwargs))
