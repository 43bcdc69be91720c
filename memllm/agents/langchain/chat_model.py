"""ChatMemLLM: a memllm model as a LangChain chat model (`BaseChatModel`).

Streams tokens as `AIMessageChunk`s, honours stop sequences (the text is cut at the first one and
generation stops there), `max_tokens`, `temperature` and `seed`, and reports usage metadata counted
with the model's own tokenizer. `invoke` joins the stream; the async methods are LangChain's own,
which run the same sync stream in a worker thread, so there is one code path. With `memory=` set,
each call hands the newest human message to a memllm `ChatAgent`, which remembers across calls and
sessions. Models load lazily on first use and are shared between instances through a small cache.

Knows nothing of stores or retrieval beyond handing them to the agent.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from memllm.agents.langchain.messages import StopScanner, content_text, to_chat_messages
from memllm.errors import ConfigError, InputError
from memllm.models import DEFAULT_MODEL

if TYPE_CHECKING:  # pragma: no cover
    from memllm.llm import MemLLM

MemoryMode = Literal["text", "kv", "hybrid"]
CALL_OPTIONS = ("model", "max_tokens", "temperature", "seed")  # per-call kwargs, besides stop

# ---------------------------------------------------------------------------- shared model cache

_CACHE_SIZE = 2
_cache: OrderedDict[tuple[str, str, str], MemLLM] = OrderedDict()
_cache_lock = threading.Lock()
_load_locks: dict[tuple[str, str, str], threading.Lock] = {}
_gen_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def load_model(name: str, device: str = "auto", dtype: str | None = None) -> MemLLM:
    """A loaded MemLLM for (name, device, dtype), shared by every ChatMemLLM in this process.

    At most two models stay loaded; the least recently used one is released first. Two threads
    asking for one model load it once; loading one model does not hold up the others."""
    from memllm.llm import MemLLM

    key = (name, device, str(dtype))
    with _cache_lock:
        load_lock = _load_locks.setdefault(key, threading.Lock())
    with load_lock:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        llm = MemLLM.from_pretrained(name, device=device, dtype=dtype)
        with _cache_lock:
            _cache[key] = llm
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        return llm


def generation_lock(llm: Any) -> threading.Lock:
    """One lock per model: generations on one model run one at a time (batch and async calls run
    in threads; a tokenizer must not be used by two threads at once)."""
    with _cache_lock:
        lock = _gen_locks.get(llm)
        if lock is None:
            lock = _gen_locks[llm] = threading.Lock()
        return lock


# ---------------------------------------------------------------------------- the chat model


@dataclass
class _Turn:
    """One reply being generated: its text pieces and the prompt's token count (asked once the pieces
    are consumed)."""

    pieces: Iterator[str]
    input_tokens: Callable[[], int]


class ChatMemLLM(BaseChatModel):
    """A memllm model as a LangChain chat model.

        from memllm.agents.langchain import ChatMemLLM
        chat = ChatMemLLM(model="smollm2-135m", max_tokens=128)       # loads on first use
        chat.invoke("Hello").content
        ChatMemLLM(llm=my_memllm)                                     # an already loaded MemLLM
        ChatMemLLM(memory="text", user="alice", store=my_store)       # remembers across calls

    Per call, `model=` names another model (loaded and cached like the first), and `stop=`,
    `max_tokens=`, `temperature=`, `seed=` override the instance's values.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(default=DEFAULT_MODEL, alias="model")
    """An alias from `memllm models`, a Hugging Face id, a model folder or a .gguf file."""
    llm: Any = Field(default=None, exclude=True)
    """An already loaded `MemLLM` (then `model_name` defaults to its name and nothing is loaded)."""
    device: str = "auto"
    dtype: str | None = None
    max_tokens: int = Field(default=256, ge=1)
    """Most tokens generated per call."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 is greedy decoding."""
    seed: int | None = None
    """Seed of the sampler when temperature > 0."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop sequences: the reply is cut before the first one, and generation stops there."""
    streaming: bool = False
    """Whether `invoke` streams through the callbacks (LangChain's flag)."""
    memory: MemoryMode | None = None
    """None: a stateless chat model. 'text' | 'kv' | 'hybrid': each call gives the newest human message
    to a memllm ChatAgent for `user`, which stores every turn and recalls memory itself."""
    user: str = "default"
    """The memory namespace (one per user or session) when `memory` is set."""
    store: Any = Field(default=None, exclude=True)
    """The MemoryStore for `memory` modes (default: a FaissStore at `store_path`)."""
    store_path: str | None = None
    """Where the default store lives when `store` is not given (default: $MEMLLM_HOME/memory, shared with `memllm chat --user`)."""
    context_memory: Any = Field(default=None, exclude=True)
    """A memllm MemoryConfig for the KV memory of 'kv' and 'hybrid' modes (default: memllm's)."""

    _agent: Any = PrivateAttr(default=None)
    _agent_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _agent_system: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _name_from_llm(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("llm") is not None:
            if "model" not in values and "model_name" not in values:
                values = {**values, "model_name": getattr(values["llm"], "name", DEFAULT_MODEL)}
        return values

    @model_validator(mode="after")
    def _check(self) -> ChatMemLLM:
        if self.memory is not None and not self.user:
            raise ConfigError("ChatMemLLM(memory=...) needs a user (the memory namespace)")
        return self

    # ------------------------------------------------------------------ LangChain identity

    @property
    def _llm_type(self) -> str:
        return "memllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "device": self.device,
            "dtype": self.dtype,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "stop": self.stop,
            "memory": self.memory,
            "user": self.user if self.memory else None,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="memllm",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    # ------------------------------------------------------------------ model and agent

    def get_llm(self, model: str | None = None) -> MemLLM:
        """The MemLLM this instance runs (loading it on first use), or the one `model` names."""
        if model is None or model == self.model_name:
            if self.llm is None:
                self.llm = load_model(self.model_name, self.device, self.dtype)
            return self.llm
        return load_model(model, self.device, self.dtype)

    def get_agent(self) -> Any:
        """The memllm ChatAgent behind `memory` modes (built on first use)."""
        if self.memory is None:
            raise ConfigError("this ChatMemLLM has no memory: pass memory='text', 'kv' or 'hybrid'")
        with self._agent_lock:
            if self._agent is None:
                try:
                    from memllm.agents.chat import ChatAgent
                except ImportError as exc:
                    raise ConfigError(
                        f"memory={self.memory!r} needs memllm.agents.chat (the chat agent), which this "
                        "install does not have: upgrade memllm, or use ChatMemLLM without memory"
                    ) from exc
                store = self.store
                if store is None:
                    store = self.store = open_default_store(self.store_path)
                extra = {"context_memory": self.context_memory} if self.context_memory is not None else {}
                self._agent = ChatAgent(self.get_llm(), store, user=self.user, memory=self.memory, **extra)
                self._agent_system = self._agent.system
            return self._agent

    # ------------------------------------------------------------------ generation

    def _call_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - set(CALL_OPTIONS) - {"stream"}  # stream: LangChain's own flag
        if unknown:
            raise ConfigError(
                f"ChatMemLLM does not take {', '.join(sorted(unknown))} per call: use model, stop, "
                "max_tokens, temperature or seed"
            )
        max_tokens = int(kwargs.get("max_tokens", self.max_tokens))
        temperature = float(kwargs.get("temperature", self.temperature))
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        return {
            "model": kwargs.get("model"),
            "stop": list(stop) if stop is not None else list(self.stop or []),
            "max_new_tokens": max_tokens,
            "temperature": temperature,
            "seed": kwargs.get("seed", self.seed),
        }

    def _turn(self, llm: MemLLM, messages: list[BaseMessage], opts: dict[str, Any]) -> _Turn:
        """The reply's text pieces, with how to count the prompt and what to do once it ends."""
        gen = {k: opts[k] for k in ("max_new_tokens", "temperature", "seed")}
        if self.memory is None:
            chat = to_chat_messages(messages)
            if not chat:
                raise InputError("ChatMemLLM needs at least one message")
            prompt = len(llm.chat_ids(chat, opts["max_new_tokens"]))
            return _Turn(llm.chat_stream(chat, **gen), lambda: prompt)
        if opts["model"] not in (None, self.model_name):
            raise ConfigError("a per-call model= cannot be used with memory: the agent owns one model")
        if not messages or not isinstance(messages[-1], HumanMessage):
            raise InputError("ChatMemLLM(memory=...) answers a human message: end the input with one")
        text = content_text(messages[-1].content)
        agent = self.get_agent()
        system = "\n".join(content_text(m.content) for m in messages if isinstance(m, SystemMessage))
        agent.system = system or self._agent_system
        kv = getattr(agent, "session", None) is not None

        def pieces() -> Iterator[str]:
            # The agent cuts at stop strings, stores the turns as far as they went (also when the caller
            # stops reading) and, in kv/hybrid mode, closes the turn in the KV stream.
            yield from agent.stream(
                text,
                stop=opts["stop"],
                max_new_tokens=opts["max_new_tokens"],
                temperature=opts["temperature"],
            )

        def prompt_tokens() -> int:
            recall = agent.last_recall()
            if kv or recall is None:  # kv/hybrid: the stream lives in KV memory; count the new message
                return llm.count_tokens(text)
            return len(llm.chat_ids(agent.build_messages(text.strip(), recall), opts["max_new_tokens"]))

        return _Turn(pieces(), prompt_tokens)

    def _chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> Iterator[ChatGenerationChunk]:
        """The reply as chunks: text pieces, then one empty last chunk carrying usage and metadata."""
        opts = self._call_options(stop, kwargs)
        llm = self.get_llm(opts["model"])
        scanner = StopScanner(opts["stop"])
        produced: list[str] = []
        emitted: list[str] = []
        with generation_lock(llm):
            turn = self._turn(llm, messages, opts)
            cut = _cut(turn.pieces, scanner, produced)
            try:
                for text in cut:
                    emitted.append(text)
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                    if run_manager is not None:
                        run_manager.on_llm_new_token(text, chunk=chunk)
                    yield chunk
            except (
                GeneratorExit
            ):  # the caller stopped reading: stop the model (the agent keeps what was seen)
                cut.close()
                raise
            input_tokens = turn.input_tokens()
        generated = llm.count_tokens("".join(produced)) if produced else 0
        output_tokens = llm.count_tokens("".join(emitted)) if emitted else 0
        if scanner.stopped:
            finish = "stop"
        elif generated >= opts["max_new_tokens"]:
            finish = "length"
        else:
            finish = "stop"
        usage = UsageMetadata(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )
        meta: dict[str, Any] = {
            "model_name": opts["model"] or self.model_name,
            "model_provider": "memllm",
            "finish_reason": finish,
        }
        if scanner.matched is not None:
            meta["stop_sequence"] = scanner.matched
        last = AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last")
        yield ChatGenerationChunk(message=last, generation_info={"finish_reason": finish})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(messages, stop, run_manager, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._chunks(messages, stop, None, kwargs))

    # _agenerate / _astream: BaseChatModel's defaults run _generate / _stream in a worker thread.


def _cut(pieces: Iterator[str], scanner: StopScanner, produced: list[str]) -> Iterator[str]:
    """The text of `pieces` up to the first stop sequence. The model stops there (its generator is
    closed, as it is when the consumer stops reading). Every raw piece is appended to `produced`."""
    try:
        for piece in pieces:
            produced.append(piece)
            text, done = scanner.push(piece)
            if text:
                yield text
            if done:
                break
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    tail = scanner.flush()
    if tail:
        yield tail


def open_default_store(path: str | None) -> Any:
    """A FaissStore with the packaged embedder at `path` (default: the one `memllm chat --user` uses)."""
    from memllm.memory_stores import FaissStore
    from memllm.memory_stores.embeddings import shared_embedder
    from memllm.models import default_store_path

    return FaissStore(path or default_store_path(), shared_embedder())
