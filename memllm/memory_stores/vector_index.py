"""One namespace's FAISS index over L2-normalised vectors, keyed by the store's int64 row ids.

Exact inner product (IndexFlatIP in an IndexIDMap2) while small; an inverted-file index (IndexIVFFlat,
inner product) once it holds `ivf_threshold` vectors, retrained when it has grown 4x since training.
Written with `faiss.write_index` (never pickle) to a temp file, checksummed, then renamed into place.
Knows nothing of SQLite, records or namespaces.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from memllm.errors import StoreError


@dataclass(frozen=True)
class IndexConfig:
    """ivf_threshold: vectors at which the exact index becomes IVF (and below half of which it turns
    back).  ivf_nprobe: lists probed per query (None: max(32, nlist // 16)).  retrain_growth: an IVF
    index is retrained once it holds this many times the vectors it was trained on.
    search_threads: OpenMP threads for one query (None: FAISS's default). One query is latency-bound;
    fanning it out over threads gains little and, on a busy machine, costs tens of ms per barrier.
    OpenMP's thread count is per calling thread, so this never changes other threads' settings."""

    ivf_threshold: int = 50_000
    ivf_nprobe: int | None = None
    retrain_growth: float = 4.0
    train_sample: int = 100_000
    seed: int = 1234
    search_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.ivf_threshold < 1000:
            raise StoreError(
                f"ivf_threshold must be >= 1000 (IVF needs data to train), got {self.ivf_threshold}"
            )
        if self.ivf_nprobe is not None and self.ivf_nprobe < 1:
            raise StoreError(f"ivf_nprobe must be >= 1, got {self.ivf_nprobe}")
        if self.search_threads is not None and self.search_threads < 1:
            raise StoreError(f"search_threads must be >= 1 or None, got {self.search_threads}")
        if self.retrain_growth <= 1.0:
            raise StoreError(f"retrain_growth must be > 1, got {self.retrain_growth}")


_TEMP = re.compile(r"\.[0-9a-f]+\.faiss\.(?P<pid>[0-9]+)\..*tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove index temp files of writers that died (killed mid-write): they hold the vectors of
    records that may have been forgotten since. Files of live processes are left alone."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or int(m.group("pid")) == os.getpid() or _alive(int(m.group("pid"))):
            continue
        if entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class VectorIndex:
    """A FAISS index of one namespace. `kind` is "flat" (exact) or "ivf"."""

    def __init__(self, dim: int, config: IndexConfig, index: faiss.Index | None = None, trained_on: int = 0):
        self.dim = dim
        self.config = config
        self.trained_on = trained_on
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if self.index.d != dim:
            raise StoreError(f"index dimension {self.index.d} differs from the embedder's {dim}")
        if self.kind == "ivf":
            self._set_nprobe()

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _set_nprobe(self) -> None:
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = self.config.ivf_nprobe or max(32, ivf.nlist // 16)
        ivf.nprobe = min(ivf.nprobe, ivf.nlist)

    @classmethod
    def build(cls, dim: int, config: IndexConfig, vectors: np.ndarray, ids: np.ndarray) -> VectorIndex:
        """A fresh index over (n, dim) float32 normalised vectors with int64 ids; its kind from n."""
        n = len(ids)
        if n >= config.ivf_threshold:
            nlist = 1 << max(4, int(math.log2(4 * math.sqrt(n))))
            quantizer = faiss.IndexFlatIP(dim)
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(config.seed)
            sample = (
                vectors
                if n <= config.train_sample
                else vectors[np.sort(rng.choice(n, config.train_sample, replace=False))]
            )
            ivf.cp.seed = config.seed
            ivf.train(np.ascontiguousarray(sample))
            out = cls(dim, config, ivf, trained_on=n)
        else:
            out = cls(dim, config)
        if n:
            out.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )
        return out

    def needs_rebuild(self) -> bool:
        """True when the kind no longer fits the size (flat too big, IVF too small or outgrown)."""
        n = self.ntotal
        if self.kind == "flat":
            return n >= self.config.ivf_threshold
        return n < self.config.ivf_threshold // 2 or n >= self.config.retrain_growth * max(self.trained_on, 1)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def ids(self) -> np.ndarray:
        """Every id the index holds (int64, unordered)."""
        if self.kind == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(self.index)
        parts = [np.zeros(0, np.int64)]
        for lst in range(ivf.nlist):
            size = ivf.invlists.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).astype(np.int64))
        return np.concatenate(parts)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest of one (dim,) query; fewer when the index holds fewer."""
        k = min(k, self.ntotal)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        threads = self.config.search_threads
        if threads is None:
            scores, ids = self.index.search(query, k)
        else:
            before = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(threads)
            try:
                scores, ids = self.index.search(query, k)
            finally:
                faiss.omp_set_num_threads(before)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def write(self, path: Path) -> str:
        """Write atomically (a temp file from `tempfile` beside it, named with this process's id so
        that `remove_stale_temps` can tell a dead writer's; then rename); returns the checksum."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            faiss.write_index(self.index, str(tmp))
            checksum = file_checksum(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return checksum

    @classmethod
    def read(cls, path: Path, dim: int, config: IndexConfig, checksum: str, trained_on: int) -> VectorIndex:
        """Read an index file whose checksum must match; StoreError when missing, altered or unreadable."""
        if not path.is_file():
            raise StoreError(f"index file {path} is missing")
        actual = file_checksum(path)
        if actual != checksum:
            raise StoreError(f"index file {path} does not match its recorded checksum")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StoreError(f"index file {path} cannot be read ({exc})") from exc
        return cls(dim, config, index, trained_on=trained_on)
