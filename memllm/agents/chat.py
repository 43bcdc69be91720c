"""ChatAgent: unlimited dialogue over a MemLLM, with SCM-style text memory that persists across runs.

Each turn: the controller recalls flash memory (recent turns) and, when its gate fires, archived
records within a token budget; the prompt is the system prompt + recalled memory + recent turns + the
message, always within the model's window; the answer streams; both turns are stored. Long turns get
an LLM-written summary when stored (after the answer, not on its path).

Modes: "text" (above). "kv" and "hybrid" stream the dialogue into a context-memory session as well;
they need memllm.session and are refused with a message where it is not available.

Knows nothing of the CLI; the store and controller come from memllm.memory_stores / agents.controller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from memllm.agents.controller import ControllerConfig, MemoryController, Recall
from memllm.errors import ConfigError
from memllm.memory_stores.records import MemoryRecord, MemoryStore

MEMORY_MODES = ("text", "kv", "hybrid")
DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly."
MEMORY_HEADER = "Things you remember from earlier conversations with this user:"
SUMMARY_PROMPT = "Summarize the following text in one short sentence, keeping names and numbers:\n\n"


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
    ) -> None:
        if memory not in MEMORY_MODES:
            raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if memory != "text":
            raise ConfigError(
                f"memory mode {memory!r} needs context memory sessions, which this build does not have yet: "
                "use --memory text"
            )
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
        system = self.system
        if recall.memory_text:
            system = f"{system}\n\n{MEMORY_HEADER}\n{recall.memory_text}"
        msgs = [{"role": "system", "content": system}]
        for rec in recall.flash:
            role = rec.metadata.get("role", "user")
            msgs.append({"role": role if role in ("user", "assistant") else "user", "content": rec.text})
        msgs.append({"role": "user", "content": message})
        return msgs

    # ------------------------------------------------------------------ turns
    def stream(self, message: str) -> Iterator[str]:
        """Stream the answer to `message`; both turns are stored once the answer is complete."""
        text = message.strip()
        if not text:
            raise ConfigError("a chat message must be non-empty")
        recall = self.controller.recall(text)
        messages = self.build_messages(text, recall)
        pieces: list[str] = []
        for piece in self.llm.chat_stream(
            messages, max_new_tokens=self.max_new_tokens, temperature=self.temperature
        ):
            pieces.append(piece)
            yield piece
        answer = "".join(pieces).strip()
        self.controller.remember(text, kind="turn", role="user")
        if answer:
            self.controller.remember(answer, kind="turn", role="assistant")

    def chat(self, message: str) -> str:
        return "".join(self.stream(message))

    def last_recall(self) -> Recall | None:
        """What the controller used for the latest answer, with scores and reasons."""
        return self.controller.last_recall()

    def history(self, limit: int = 50) -> list[MemoryRecord]:
        return self.store.list(
            self.controller.namespace, filters={"kind": "turn"}, limit=limit, newest_first=True
        )[::-1]
