"""ChatAgent: unlimited dialogue over a MemLLM, with SCM-style text memory that persists across runs.

Each turn: the controller recalls flash memory (recent turns) and, when its gate fires, archived
records within a token budget; the prompt is the system prompt + recalled memory + recent turns + the
message, always within the model's window; the answer streams; both turns are stored. Long turns get
an LLM-written summary when stored (after the answer, not on its path).

Modes: "text" (above). "kv": the dialogue itself is streamed into a context-memory session (InfLLM-
style KV memory, memllm.session), turn by turn, and every answer continues that stream; the session is
saved next to the store at `close()` and restored by the next agent of the same user. "hybrid": kv,
plus the text memory's recalled records placed in the turn, for recall across sessions and beyond
what KV retrieval finds. Turns are stored in the text memory in every mode. kv/hybrid decode greedily.

Knows nothing of the CLI; the store and controller come from memllm.memory_stores / agents.controller.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memllm.agents.controller import ControllerConfig, MemoryController, Recall
from memllm.config import MemoryConfig
from memllm.errors import ConfigError, UnsupportedModelError
from memllm.generation import StopScanner
from memllm.memory_stores.records import MemoryRecord, MemoryStore

MEMORY_MODES = ("text", "kv", "hybrid")
DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly."
MEMORY_HEADER = "From our earlier conversations:"
SUMMARY_PROMPT = "Summarize the following text in one short sentence, keeping names and numbers:\n\n"


def build_messages(system: str, message: str, recall: Recall | None) -> list[dict[str, str]]:
    """The chat for one turn: system prompt, recent turns, then the message with the recalled memory
    placed right before it (small models use memory near the question far better than in the system
    prompt: measured in benchmarks/RESULTS.md)."""
    msgs = [{"role": "system", "content": system}]
    for rec in recall.flash if recall is not None else []:
        role = rec.metadata.get("role", "user")
        msgs.append({"role": role if role in ("user", "assistant") else "user", "content": rec.text})
    if recall is not None and recall.memory_text:
        message = f"{MEMORY_HEADER}\n{recall.memory_text}\n\n{message}"
    msgs.append({"role": "user", "content": message})
    return msgs


def user_namespace(user: str) -> str:
    if not user or not user.strip():
        raise ConfigError("a chat user name must be non-empty (e.g. --user alice)")
    return f"user:{user.strip()}"


class ChatAgent:
    """Chat with memory. `llm` is a MemLLM (or anything with chat_stream, chat, count_tokens, trained_len)."""

    def __init__(
        self,
        llm: Any,
        store: MemoryStore,
        *,
        user: str = "default",
        memory: str = "text",
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        controller: ControllerConfig | None = None,
        summarize: bool = True,
        context_memory: MemoryConfig | None = None,
    ) -> None:
        if memory not in MEMORY_MODES:
            raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        self.llm = llm
        self.store = store
        self.user = user
        self.memory = memory
        self.system = system or DEFAULT_SYSTEM
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        cfg = controller or self.default_controller_config(llm.trained_len, max_new_tokens)
        self.controller = MemoryController(
            store,
            user_namespace(user),
            count_tokens=llm.count_tokens,
            summarize=self._summarize if summarize else None,
            config=cfg,
        )
        self.context_memory = context_memory
        self.session: Any = None
        if memory != "text":
            self.session = self._open_session()

    # ------------------------------------------------------------------ kv session
    def snapshot_path(self) -> Path | None:
        root = getattr(self.store, "path", None)
        if root is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.controller.namespace)
        return Path(root) / "kv" / safe

    def _open_session(self) -> Any:
        path = self.snapshot_path()
        if path is not None and (path / "manifest.json").is_file():
            return self.llm.restore(str(path))
        return self.llm.session(self.context_memory)

    def close(self) -> None:
        """Save the kv session (kv/hybrid) so the next agent of this user continues the same stream."""
        path = self.snapshot_path()
        if self.session is not None and path is not None and self.session.cache.seen_tokens > 0:
            self.session.save(str(path))

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.llm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=False
        )

    def _segment(self, turn: list[dict[str, str]]) -> str:
        """The chat-template text of `turn` as a continuation of the stream (system prompt only once)."""
        system = [{"role": "system", "content": self.system}]
        full = self._render(system + turn, True)
        if self.session.cache.seen_tokens == 0:
            return full
        prefix = self._render(system, False)
        if not full.startswith(prefix):
            raise UnsupportedModelError(
                f"the chat template of {getattr(self.llm, 'name', 'this model')} does not render turns "
                "incrementally, which kv memory needs: use --memory text"
            )
        return full[len(prefix) :]

    @staticmethod
    def _kv_turn(text: str, recall: Recall | None) -> list[dict[str, str]]:
        memory = recall.memory_text if recall is not None else ""
        content = f"{MEMORY_HEADER}\n{memory}\n\n{text}" if memory else text
        return [{"role": "user", "content": content}]

    def _close_turn(self, turn: list[dict[str, str]], answer: str) -> None:
        """Feed what the template writes after an answer (e.g. `<|im_end|>\\n`): the stream stays well-formed."""
        system = [{"role": "system", "content": self.system}]
        opened = self._render(system + turn, True)
        closed = self._render([*system, *turn, {"role": "assistant", "content": answer}], False)
        tail = closed[len(opened) :] if closed.startswith(opened) else ""
        if tail.startswith(answer) and tail[len(answer) :]:
            self.session.feed(tail[len(answer) :])
        else:
            self.session.feed_ids([self.llm.tokenizer.eos_token_id])

    @staticmethod
    def default_controller_config(window: int, max_new_tokens: int) -> ControllerConfig:
        """Budgets as shares of the window left after the answer: memory 1/4, recent turns 1/2."""
        room = max(window - max_new_tokens - 128, 64)
        return ControllerConfig(memory_tokens=room // 4, flash_tokens=room // 2)

    def _summarize(self, text: str) -> str:
        return self.llm.chat(
            [{"role": "user", "content": SUMMARY_PROMPT + text}], max_new_tokens=48, temperature=0.0
        )

    # ------------------------------------------------------------------ prompt
    def build_messages(self, message: str, recall: Recall) -> list[dict[str, str]]:
        return build_messages(self.system, message, recall)

    # ------------------------------------------------------------------ turns
    def stream(
        self,
        message: str,
        *,
        stop: list[str] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[str]:
        """Stream the answer to `message`, ending before the first `stop` string if one appears.

        Both turns are stored when the stream ends, also when the caller stops reading early (the
        answer as far as it was streamed); in kv/hybrid mode the turn is closed in the stream too.
        """
        text = message.strip()
        if not text:
            raise ConfigError("a chat message must be non-empty")
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        recall = self.controller.recall(text) if self.memory != "kv" else None
        if self.session is not None:
            turn = self._kv_turn(text, recall)
            source = self.session.generate(self._segment(turn), max_new_tokens=limit)
        else:
            turn = []
            source = self.llm.chat_stream(
                self.build_messages(text, recall),
                max_new_tokens=limit,
                temperature=self.temperature if temperature is None else temperature,
            )
        scanner = StopScanner(stop)
        shown = ""
        try:
            for piece in source:
                out, stopped = scanner.push(piece)
                if out:
                    shown += out
                    yield out
                if stopped:
                    return
            tail = scanner.flush()
            if tail:
                shown += tail
                yield tail
        finally:
            if self.session is not None:
                self._close_turn(turn, shown)
            self.controller.remember(text, kind="turn", role="user")
            if shown.strip():
                self.controller.remember(shown.strip(), kind="turn", role="assistant")

    def chat(self, message: str) -> str:
        return "".join(self.stream(message))

    def last_recall(self) -> Recall | None:
        """What the controller used for the latest answer, with scores and reasons."""
        return self.controller.last_recall()

    def history(self, limit: int = 50) -> list[MemoryRecord]:
        return self.store.list(
            self.controller.namespace, filters={"kind": "turn"}, limit=limit, newest_first=True
        )[::-1]
