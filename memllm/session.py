"""Session: a stream of text read into one context memory (InfLLM-style), asked and generated from.

`feed(text)` streams any length through chunked prefill; `ask(q)` answers and rolls the memory back
so the document memory is unchanged; `generate(...)` continues the stream (what it generates stays);
`save(path)` / `Session.restore(llm, path)` write and read a snapshot (safetensors + a versioned JSON
manifest, no pickle). `llm` is any object with .model, .tokenizer, .device, .dtype, .trained_len and
.name (memllm.llm.MemLLM). Knows nothing of text memory, agents or the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from memllm.config import MemoryConfig
from memllm.context import prefill
from memllm.context.attach import attach
from memllm.context.cache import ContextMemoryCache
from memllm.context.support import inspect_model
from memllm.errors import InputError, SnapshotError
from memllm.generation import RepetitionGuard, decode_stream

SNAPSHOT_FORMAT = "memllm-context-snapshot"
SNAPSHOT_VERSION = 1


def _stop_ids(llm: Any) -> set[int]:
    if hasattr(llm, "stop_ids"):
        return set(llm.stop_ids())
    eos = getattr(llm.tokenizer, "eos_token_id", None)
    return {eos} if eos is not None else set()


class Session:
    """One context memory over one model. Batch size 1; not thread-safe."""

    def __init__(self, llm: Any, memory: MemoryConfig | None = None):
        self.llm = llm
        spec = inspect_model(llm.model)
        trained = min(spec.trained_len, int(getattr(llm, "trained_len", spec.trained_len)))
        self.spec = replace(spec, trained_len=trained)
        self.cache = ContextMemoryCache(self.spec, memory or MemoryConfig())
        self.config = self.cache.config
        self.last_logits: torch.Tensor | None = None  # (vocab,) fp32: next-token logits after the stream
        self.asks = 0

    # ---- reading ---------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        tok = self.llm.tokenizer
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        bos = getattr(tok, "bos_token_id", None)
        if self.cache.seen_tokens == 0 and bos is not None and getattr(tok, "add_bos_token", False):
            if not ids or ids[0] != bos:
                ids = [bos, *ids]
        return ids

    def feed_ids(
        self, ids: list[int] | torch.Tensor, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Append token ids to the stream (chunked; progress(done, total))."""
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if t.shape[1] == 0:
            return
        with attach(self.llm.model, cache=self.cache):
            logits = prefill.feed(self.llm.model, self.cache, t, progress)
        self.last_logits = logits

    def feed(self, text: str, progress: Callable[[int, int], None] | None = None) -> int:
        """Read `text` into memory; returns the number of tokens added."""
        if not isinstance(text, str):
            raise InputError(f"feed() takes text (str), got {type(text).__name__}")
        ids = self._encode(text)
        self.feed_ids(ids, progress)
        return len(ids)

    # ---- generating ------------------------------------------------------------------------------
    def generate_ids(
        self,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 32,
        stop: set[int] | None = None,
        guard: RepetitionGuard | None = None,
    ) -> Iterator[int]:
        """Greedy continuation of the stream (after `prompt`): yields token ids; they stay in memory.
        `guard` (memllm.generation.RepetitionGuard) adjusts each step's logits for the tokens generated."""
        stop = _stop_ids(self.llm) if stop is None else stop
        if prompt is not None:
            ids = self._encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.feed_ids(ids)
        if self.last_logits is None:
            raise InputError("nothing to continue from: feed text or give a prompt first")
        model = self.llm.model
        with attach(model, cache=self.cache):
            generated: list[int] = []
            for _ in range(max_new_tokens):
                logits = self.last_logits
                if guard is not None and generated:
                    logits = guard.apply(logits.reshape(1, -1), generated)
                tok = int(logits.argmax())
                if tok in stop:
                    return
                generated.append(tok)
                self.last_logits = prefill.step(model, self.cache, torch.tensor([[tok]]))
                yield tok

    def generate(
        self,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 32,
        guard: RepetitionGuard | None = None,
    ) -> Iterator[str]:
        """Like generate_ids, yielding text pieces (decoded incrementally, so multi-token characters are whole)."""
        yield from decode_stream(self.llm.tokenizer, self.generate_ids(prompt, max_new_tokens, guard=guard))

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Within the block, what is fed and generated is rolled back afterwards (also on error), and
        while it lasts its tokens cut no units where they fit the held limit (cache.hold_cuts): they stay
        in the window at exact positions, and short calls stay eligible for the static step."""
        checkpoint = self.cache.checkpoint()
        logits = self.last_logits
        try:
            with self.cache.hold_cuts():
                yield
        finally:
            self.cache.rollback(checkpoint)
            self.last_logits = logits
            self.asks += 1

    def ask(self, question: str, max_new_tokens: int = 32) -> str:
        """Answer from memory; the question and answer are rolled back out of the memory afterwards."""
        with self.answering():
            return "".join(self.generate(question, max_new_tokens)).strip()

    # ---- accounting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = self.cache.stats()
        s["device_bytes"] = s["device_bytes_window"] + s["device_bytes_index"]
        s["asks"] = self.asks
        return s

    # ---- snapshots -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the memory to folder `path`: manifest.json + state.safetensors."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        layers = []
        for i, layer in enumerate(self.cache.layers):
            for name, t in layer.state().items():
                tensors[f"layer{i}.{name}"] = t
            layers.append(
                {"seen": layer.seen, "cut": layer.cut, "base": layer.base, "units": layer.store.n_units}
            )
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits.to("cpu").contiguous()
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "model": getattr(self.llm, "name", self.spec.name),
            "spec": {
                k: getattr(self.spec, k)
                for k in ("num_layers", "num_heads", "kv_heads", "head_dim", "trained_len")
            },
            "dtype": str(self.spec.dtype).removeprefix("torch."),
            "memory": self.config.to_dict(),
            "layers": layers,
        }
        save_file(tensors, str(folder / "state.safetensors"))
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def restore(cls, llm: Any, path: str | Path) -> Session:
        """A session equal to the saved one (same next-token logits) on `llm`."""
        from safetensors.torch import load_file

        folder = Path(path)
        mpath, spath = folder / "manifest.json", folder / "state.safetensors"
        if not mpath.is_file() or not spath.is_file():
            raise SnapshotError(
                f"no memory snapshot at {folder}: expected manifest.json and state.safetensors"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as exc:
            raise SnapshotError(f"snapshot manifest {mpath} is not valid JSON: {exc}") from exc
        if manifest.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{mpath} is not a memllm context snapshot")
        if manifest.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"snapshot version {manifest.get('version')} is not supported (this memllm reads {SNAPSHOT_VERSION})"
            )
        session = cls(llm, MemoryConfig.from_dict(manifest["memory"]))
        want = {k: getattr(session.spec, k) for k in manifest["spec"]}
        if want != manifest["spec"]:
            raise SnapshotError(
                f"snapshot was written for a model shaped {manifest['spec']}, this model is {want}: "
                f"restore it with model '{manifest.get('model')}'"
            )
        tensors = load_file(str(spath))
        for i, (layer, meta) in enumerate(zip(session.cache.layers, manifest["layers"], strict=True)):
            prefix = f"layer{i}."
            state = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
            layer.load_state(state, seen=meta["seen"], cut=meta["cut"], base=meta["base"])
        if "last_logits" in tensors:
            session.last_logits = tensors["last_logits"].to(session.cache.layers[0].device)
        return session
