"""MemLLM: a loaded model with its tokenizer, and the entry points to chat and memory sessions.

Resolution and the weight cache live in memllm.models; the decode loop in memllm.generation; context
memory sessions in memllm.session (imported when first used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from memllm import models
from memllm.config import MemoryConfig
from memllm.errors import ConfigError, ModelNotFoundError
from memllm.host_budget import HostBudget

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from memllm.engine import BatchEngine
    from memllm.session import Session

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without CUDA is a ConfigError naming the fix."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available: use --device cpu or auto")
    return device


def pick_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in table:
        raise ConfigError(f"dtype must be one of auto, {', '.join(table)}, got {dtype!r}")
    return table[dtype]


class MemLLM:
    """A causal LM ready for chat and memory sessions. Build it with `MemLLM.from_pretrained(name)`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "custom",
        memory: MemoryConfig | None = None,
        trained_len: int | None = None,
        host_budget: int | str | HostBudget | None = None,
    ) -> None:
        """host_budget: bytes of host memory (pinned on a GPU) the context memories of all live
        sessions of this model may hold together (e.g. '8GiB'); a session or feed past it is refused
        with HostBudgetError (memllm.host_budget). None: each session is checked only
        against the process's memory."""
        self.host_budget = (
            host_budget
            if host_budget is None or isinstance(host_budget, HostBudget)
            else HostBudget(host_budget)
        )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.memory = memory
        self.trained_len = int(trained_len or getattr(model.config, "max_position_embeddings", 2048))
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name: str = models.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        memory: MemoryConfig | None = None,
        progress: Callable[[str], None] | None = None,
        host_budget: int | str | HostBudget | None = None,
    ) -> MemLLM:
        """Load an alias, HF id, model folder or .gguf file (see memllm.models.resolve)."""
        if host_budget is not None and not isinstance(host_budget, HostBudget):
            host_budget = HostBudget(host_budget)  # checked before the weights are loaded
        resolved = models.resolve(name)
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        location = models.weights_location(resolved, progress)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
        except OSError as exc:
            if resolved.kind == "hub":
                raise ModelNotFoundError(
                    f"{models.not_found_message(name)} (transformers said: {str(exc).splitlines()[0]})"
                ) from exc
            raise
        model.to(dev).eval()
        return cls(model, tokenizer, name=name, memory=memory, trained_len=resolved.trained_len,
                   host_budget=host_budget)  # fmt: skip

    # ------------------------------------------------------------------ tokens
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    def chat_ids(self, messages: Sequence[dict[str, str]], max_new_tokens: int) -> list[int]:
        """The chat-template prompt ids; the oldest turns are dropped until prompt + answer fit the window."""
        msgs = list(messages)
        while True:
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            ids = list(ids)
            if len(ids) + max_new_tokens <= self.trained_len or len(msgs) <= 1:
                break
            msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]
        budget = self.trained_len - max_new_tokens
        if len(ids) > budget:  # one message alone is too long: keep its end
            ids = ids[-budget:]
        return ids

    # ------------------------------------------------------------------ chat
    def chat_stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram: int = 0,
        answer_prefix: str = "",
    ) -> Iterator[str]:
        """Stream the assistant's reply to a chat (list of {'role', 'content'}) as text pieces.

        repetition_penalty (> 1) and no_repeat_ngram (> 0) guard against loops (see
        memllm.generation.RepetitionGuard); both apply to the answer's own tokens only. answer_prefix:
        the reply starts with this text (streamed first; the model writes what follows it, within
        max_new_tokens more tokens)."""
        from memllm.generation import RepetitionGuard

        if not 1 <= max_new_tokens <= self.trained_len:
            raise ConfigError(
                f"max_new_tokens must be between 1 and the model's context ({self.trained_len:,}), got {max_new_tokens:,}"
            )
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        guard = RepetitionGuard(repetition_penalty, no_repeat_ngram)
        ids = self.reply_ids(messages, max_new_tokens, answer_prefix)
        if answer_prefix:
            yield answer_prefix
        yield from self.reply_stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                     guard=guard if guard.active else None)  # fmt: skip

    def reply_ids(self, messages: Sequence[dict[str, str]], max_new_tokens: int, answer_prefix: str = "") -> list[int]:
        """The prompt ids of a reply to `messages` (chat_ids, room left for max_new_tokens more), then
        answer_prefix's: what chat_stream generates from."""
        head = self.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
        return self.chat_ids(messages, max_new_tokens + len(head)) + list(head)

    def reply_stream(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        guard: Any = None,
    ) -> Iterator[str]:
        """The text pieces of the model's reply after the prompt `ids` (rendered, e.g. by chat_ids), the
        model's own attention over a DynamicCache: what chat_stream streams after its answer_prefix.
        guard: a memllm.generation.RepetitionGuard over the reply's own tokens, or None."""
        import torch
        from transformers import DynamicCache

        from memllm.generation import decode_stream, generate_ids

        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        tokens = generate_ids(
            self.model,
            torch.tensor([list(ids)], device=self.device),
            cache=DynamicCache(config=self.model.config),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_ids=self.stop_ids(),
            generator=gen,
            guard=guard,
        )
        yield from decode_stream(self.tokenizer, tokens)

    def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> str:
        return "".join(self.chat_stream(messages, **kwargs))

    # ------------------------------------------------------------------ memory sessions
    def session(self, memory: MemoryConfig | None = None, embedder: Any = None) -> Session:
        """A streaming session with its own context memory (see memllm.session). embedder (a memllm
        Embedder): a text index over the memory's units, which the text selectors (the default "lexical",
        "hybrid", "text") read."""
        from memllm.session import Session

        return Session(self, memory or self.memory, embedder=embedder)

    def sessions(self, impl: str = "fast") -> BatchEngine:
        """An engine that decodes many sessions of this model together, one model call per step
        (continuous batching; see memllm.engine). impl "fast" stacks steady sessions' attention,
        "reference" runs each session's own attention in the batched call."""
        from memllm.engine import BatchEngine

        return BatchEngine(self, impl)

    def restore(self, path: str, embedder: Any = None) -> Session:
        """A session restored from a snapshot written by `Session.save(path)` (embedder: its text
        index's, see Session.restore)."""
        from memllm.session import Session

        return Session.restore(self, path, embedder=embedder)
