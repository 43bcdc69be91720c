"""Context-memory snapshots on disk: every file named in a manifest with its sha256, the manifest last.

A snapshot folder holds:
    manifest.json            the one commit point, written last and atomically (temp file + rename):
                             format, version, the model's name and weights fingerprint, the namespace it
                             belongs to (a chat user's, or none), shapes, the memory config, per-layer
                             counters, and each file below with its size and sha256
    units-<gen>.safetensors  memory units cut since the previous save, every layer (never rewritten:
                             saving after each chat answer appends the new units only)
    head-<gen>.safetensors   sinks, local window and next-token logits (bounded by n_init + n_local)
A save writes its new files first (each atomically), then the manifest; files no manifest names any
more are removed after it. A reader checks every named file's size and checksum, the weights
fingerprint and the namespace, so a torn or foreign snapshot is refused (SnapshotError), never
restored silently. Version 1 snapshots (manifest + state.safetensors, no checksums) are still read
by `read_checked`/`restore_into` when no namespace is required. Knows nothing of chat, text memory or the CLI.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from memllm import validate
from memllm.atomic import atomic_path, write_text
from memllm.errors import SnapshotError, write_error
from memllm.savedir import check_target

FORMAT = "memllm-context-snapshot"
VERSION = 2
MANIFEST = "manifest.json"
MAX_PARTS = 32  # unit files before a save rewrites them as one
MAX_MANIFEST_BYTES = 16 << 20
SPEC_KEYS = ("num_layers", "num_heads", "kv_heads", "head_dim", "trained_len")
_OWN_FILE = re.compile(r"(units|head|state)-[0-9]+\.safetensors|state\.safetensors")
_OWN_TEMP = re.compile(
    r"\.(manifest\.json|(units|head|state)-[0-9]+\.safetensors|state\.safetensors)\..+\.tmp"
)
_HEAD_KEYS = ("sink_k", "sink_v", "local_k", "local_v", "local_score")
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _allowed(rel: str) -> bool:
    return rel in (MANIFEST, "name.json") or bool(_OWN_FILE.fullmatch(rel) or _OWN_TEMP.fullmatch(rel))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """32 hex characters identifying a model's weights: names, shapes and a strided sample of values
    of a few parameters, rounded to bf16 (so the same weights in fp32 or bf16 match)."""
    if model in _fingerprints:
        return _fingerprints[model]
    h = hashlib.sha256()
    params = list(model.named_parameters())
    picks = params[:: max(1, len(params) // 8)][:8] + params[-1:]
    with torch.no_grad():
        for name, p in picks:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    _fingerprints[model] = h.hexdigest()[:32]
    return _fingerprints[model]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor], **info: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    path = folder / name
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
            digest, size = file_sha256(tmp), tmp.stat().st_size
    except SafetensorError as exc:  # safetensors reports the OSError of a failed write as its own
        raise write_error(OSError(_errno_of(str(exc)), str(exc)), f"the memory snapshot file {path}") from exc
    except OSError as exc:
        raise write_error(exc, f"the memory snapshot file {path}") from exc
    return {"name": name, "sha256": digest, "bytes": size, **info}


def _errno_of(message: str) -> int:
    """The errno in safetensors' "I/O error: ... (os error N)", else EIO."""
    m = re.search(r"os error (\d+)", message)
    return int(m.group(1)) if m else 5


def _unit_range(store: Any, start: int, end: int) -> dict[str, torch.Tensor]:
    """Units [start, end) of one layer's UnitStore as host tensors (no copy of the other units)."""
    out: dict[str, torch.Tensor] = {"repr": store.repr_keys()[:, start:end].to("cpu").contiguous()}
    if end <= start:
        return out
    per = store.segment_units
    for name in store.segments[0]:
        parts, i = [], start
        while i < end:
            off = i % per
            take = min(end - i, per - off)
            parts.append(store.segments[i // per][name][off : off + take])
            i += take
        out[name] = torch.cat(parts).to("cpu").contiguous()
    return out


def _describe(session: Any, namespace: str | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    llm, spec = session.llm, session.spec
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": getattr(llm, "name", spec.name),
        "fingerprint": weights_fingerprint(llm.model),
        "namespace": namespace,
        "spec": {
            k: getattr(spec, k) for k in SPEC_KEYS
        },
        "dtype": str(spec.dtype).removeprefix("torch."),
        "memory": session.config.to_dict(),
        "extra": dict(extra or {}),
    }


class SnapshotWriter:
    """Saves one session to one folder again and again; each save appends the units cut since the
    last one. `manifest`: the manifest of the snapshot the session was restored from (to continue it)."""

    def __init__(self, folder: str | Path, namespace: str | None = None, manifest: dict | None = None):
        self.folder = Path(folder)
        self.namespace = namespace
        self.parts: list[dict[str, Any]] = []
        self.saved_units: list[int] = []
        self.generation = 0
        if manifest is not None and manifest.get("version") == VERSION:
            self.parts = [f for f in manifest["files"] if f["kind"] == "units"]
            self.saved_units = [int(m["units"]) for m in manifest["layers"]]
            self.generation = int(manifest.get("generation", 0))

    def remove_stale_temps(self) -> None:
        """Remove temporary files of saves that were killed (call only while no other process saves
        here: the chat holds the user's lock)."""
        if self.folder.is_dir():
            for f in self.folder.iterdir():
                if _OWN_TEMP.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)

    def save(self, session: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the session's new state; returns the manifest committed."""
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        layers = session.cache.layers
        if layers and layers[0].device.type == "cuda":
            torch.cuda.synchronize(layers[0].device)  # unit copies to host memory are asynchronous
        now = [layer.store.n_units for layer in layers]
        full = (
            len(self.saved_units) != len(now)
            or any(n < s for n, s in zip(now, self.saved_units, strict=True))
            or len(self.parts) >= MAX_PARTS
        )
        start = [0] * len(now) if full else list(self.saved_units)
        gen = self.generation + 1
        files = [] if full else list(self.parts)
        if any(n > s for n, s in zip(now, start, strict=True)):
            tensors = {}
            for i, layer in enumerate(layers):
                for name, t in _unit_range(layer.store, start[i], now[i]).items():
                    tensors[f"layer{i}.{name}"] = t
            ranges = [[s, n] for s, n in zip(start, now, strict=True)]
            files.append(
                _write_tensors(folder, f"units-{gen:06d}.safetensors", tensors, kind="units", units=ranges)
            )
        head: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            cp = layer.checkpoint()
            for key in _HEAD_KEYS:
                head[f"layer{i}.{key}"] = cp[key].to("cpu").contiguous()
        if session.last_logits is not None:
            head["last_logits"] = session.last_logits.to("cpu").contiguous()
        stream, seen = getattr(session, "text_index", None), session.cache.seen_tokens
        if stream is not None and len(stream.ids) >= seen:  # beyond `seen`: what a rollback left
            # the stream's token ids (4 bytes a token), so a restored session's text index reads its text
            head["stream_ids"] = torch.from_numpy(np.frombuffer(stream.ids, dtype=np.intc)[:seen].copy())
        head_file = _write_tensors(folder, f"head-{gen:06d}.safetensors", head, kind="head")
        manifest = _describe(session, self.namespace, extra)
        manifest.update(
            generation=gen,
            tokens=session.cache.seen_tokens,
            layers=[
                {"seen": layer.seen, "cut": layer.cut, "base": layer.base, "units": layer.store.n_units}
                for layer in layers
            ],  # fmt: skip
            files=[*files, head_file],
        )
        write_text(folder / MANIFEST, json.dumps(manifest, indent=1))  # the commit point
        named = {f["name"] for f in manifest["files"]}
        for f in folder.iterdir():  # only files of memllm's own naming that no manifest names now
            if _OWN_FILE.fullmatch(f.name) and f.name not in named and not f.is_symlink():
                f.unlink(missing_ok=True)
        self.parts, self.saved_units, self.generation = files, now, gen
        return manifest


def save_session(session: Any, path: str | Path, namespace: str | None = None) -> Path:
    """A whole snapshot of `session` in folder `path`: new, empty, or a context snapshot before
    (anything else is refused: memllm never removes files it did not write)."""
    folder = check_target(path, FORMAT, _allowed)
    old = None
    if (folder / MANIFEST).is_file():
        try:
            old = read_manifest(folder)
        except SnapshotError:
            old = None
    writer = SnapshotWriter(folder, namespace, old)
    writer.saved_units = []  # a whole save: rewrite the units as one file
    writer.save(session)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the snapshot in `folder`, format and version checked (files not yet)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise SnapshotError(f"no memory snapshot at {folder}: expected {MANIFEST}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{path} is too large to be a memllm snapshot manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a memllm context snapshot")
    if manifest.get("version") not in (1, VERSION):
        raise SnapshotError(
            f"snapshot version {manifest.get('version')} is not supported (this memllm reads 1 and {VERSION})"
        )
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """SnapshotError unless every field restore reads has its type and range (a hand-edited manifest
    is refused here, not by a traceback while the tensors are loaded)."""

    def err(msg: str) -> SnapshotError:
        return SnapshotError(f"snapshot manifest {path} is altered: {msg}")

    spec = validate.obj(manifest.get("spec"), "spec", err)
    if set(spec) != set(SPEC_KEYS):
        raise err(f"spec must hold exactly {', '.join(SPEC_KEYS)}")
    for key in SPEC_KEYS:
        validate.integer(spec[key], f"spec.{key}", err, 1 if key != "trained_len" else 0)
    validate.obj(manifest.get("memory"), "memory", err)
    validate.obj(manifest.get("extra", {}), "extra", err)
    validate.text(manifest.get("model"), "model", err, 4096, optional=True)
    validate.text(manifest.get("namespace"), "namespace", err, 1 << 16, optional=True)
    layers = validate.seq(manifest.get("layers"), "layers", err, 4096)
    for i, meta in enumerate(layers):
        meta = validate.obj(meta, f"layers[{i}]", err)
        seen = validate.integer(meta.get("seen"), f"layers[{i}].seen", err)
        validate.integer(meta.get("base"), f"layers[{i}].base", err, 0, seen)
        validate.boolean(meta.get("cut"), f"layers[{i}].cut", err)
        validate.integer(meta.get("units", 0), f"layers[{i}].units", err, 0, seen)
    counts = {meta["seen"] for meta in layers}
    if len(counts) > 1:  # every layer sees every token of the stream
        raise err(f"the layers' seen differ ({min(counts)} to {max(counts)})")
    if manifest["version"] != VERSION:
        return
    validate.text(manifest.get("fingerprint"), "fingerprint", err, 256)
    tokens = validate.integer(manifest.get("tokens"), "tokens", err)
    if counts and tokens not in counts:
        raise err(f"tokens is {tokens}, the layers' seen {min(counts)}")
    for i, entry in enumerate(validate.seq(manifest.get("files"), "files", err, 4 * MAX_PARTS)):
        entry = validate.obj(entry, f"files[{i}]", err)
        validate.text(entry.get("name"), f"files[{i}].name", err, 255)
        validate.one_of(entry.get("kind"), ("head", "units"), f"files[{i}].kind", err)
        validate.integer(entry.get("bytes"), f"files[{i}].bytes", err)
        validate.text(entry.get("sha256"), f"files[{i}].sha256", err, 64)


def verify(
    folder: str | Path, manifest: dict[str, Any], llm: Any = None, namespace: str | None = None
) -> None:
    """SnapshotError unless every file the manifest names is there with its size and checksum, and
    the snapshot belongs to `namespace` and to `llm`'s weights (when given)."""
    folder = Path(folder)
    if manifest.get("version") != VERSION:
        if namespace is not None:
            raise SnapshotError(f"snapshot at {folder} was written by an older memllm, without checksums")
        return
    if namespace is not None and manifest.get("namespace") != namespace:
        raise SnapshotError(
            f"snapshot at {folder} belongs to {manifest.get('namespace')!r}, not {namespace!r}"
        )
    if llm is not None:
        mine = weights_fingerprint(llm.model)
        if manifest.get("fingerprint") != mine:
            raise SnapshotError(
                f"snapshot at {folder} was written with model {manifest.get('model')!r} (weights "
                f"{str(manifest.get('fingerprint'))[:8]!r}), not this {getattr(llm, 'name', 'model')!r} "
                f"(weights {mine[:8]!r}): restore it with that model"
            )
    for entry in manifest.get("files", []):
        path = folder / str(entry.get("name"))
        if not _OWN_FILE.fullmatch(path.name) or path.is_symlink() or not path.is_file():
            raise SnapshotError(f"snapshot at {folder} is incomplete: {path.name} is missing")
        if path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            raise SnapshotError(
                f"snapshot at {folder} is torn or altered: {path.name} does not match its checksum"
            )


_SESSION_KEYS = ("last_logits", "stream_ids")  # the head file's tensors that are not a layer's


def _load_v2(folder: Path, manifest: dict[str, Any], n_layers: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    states: list[dict[str, Any]] = [{} for _ in range(n_layers)]
    units: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(n_layers)]
    extra: dict[str, torch.Tensor] = {}
    for entry in manifest["files"]:
        tensors = load_file(str(folder / entry["name"]))
        if entry["kind"] == "head":
            extra = {k: tensors.pop(k) for k in _SESSION_KEYS if k in tensors}
            for key, t in tensors.items():
                layer, name = key.split(".", 1)
                states[int(layer.removeprefix("layer"))][name] = t
        else:
            for key, t in tensors.items():
                layer, name = key.split(".", 1)
                units[int(layer.removeprefix("layer"))].setdefault(name, []).append(t)
    for state, parts, meta in zip(states, units, manifest["layers"], strict=True):
        for name, ts in parts.items():
            state[f"units.{name}"] = torch.cat(ts, dim=1 if name == "repr" else 0)
        got = state["units.repr"].shape[1] if "units.repr" in state else 0
        if got != meta["units"]:
            raise SnapshotError(f"snapshot at {folder} is torn: {got} units stored, {meta['units']} recorded")
    return states, extra


def _load_v1(folder: Path, manifest: dict[str, Any], n_layers: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    spath = folder / "state.safetensors"
    if not spath.is_file():
        raise SnapshotError(f"no memory snapshot at {folder}: expected {MANIFEST} and state.safetensors")
    tensors = load_file(str(spath))
    states = []
    for i, meta in enumerate(manifest["layers"]):
        prefix = f"layer{i}."
        state = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        got = state["units.repr"].shape[1] if "units.repr" in state else 0
        if got != meta["units"]:
            raise SnapshotError(f"snapshot at {folder} is torn: {got} units stored, {meta['units']} recorded")
        states.append(state)
    return states, {k: tensors[k] for k in _SESSION_KEYS if k in tensors}


def _check_shapes(layer: Any, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Every head tensor has the layer's kv heads first and head_dim last (or is a score row)."""
    spec = layer.spec
    for key in ("sink_k", "sink_v", "local_k", "local_v", "units.repr"):
        t = state[key]
        if t.dim() != 3 or t.shape[0] != spec.kv_heads or t.shape[-1] != spec.head_dim:
            raise SnapshotError(
                f"snapshot at {folder} is altered: {key} has shape {tuple(t.shape)}, this model needs "
                f"({spec.kv_heads}, n, {spec.head_dim})"
            )


def _check_counts(layer: Any, meta: dict[str, Any], folder: Path) -> None:
    """A loaded layer holds `seen` tokens (its sinks, its units, its window), and none in sinks or units before
    its first cut: else the next call's positions would not be the stream's."""
    sinks, window = layer.sink_k.shape[-2], layer.local_k.shape[-2]
    held = sinks + layer.store.n_units * layer.config.block_size + window
    if held != meta["seen"] or (not meta["cut"] and held != window):
        raise SnapshotError(
            f"snapshot at {folder} is altered: layer {layer.layer_idx} holds {held} tokens "
            f"({sinks} sinks, {layer.store.n_units} units, a window of {window}), its manifest says seen "
            f"{meta['seen']}, cut {meta['cut']}"
        )


def read_checked(llm: Any, path: str | Path, namespace: str | None = None) -> dict[str, Any]:
    """The manifest of the snapshot at `path`, checked first (see `verify`) against `llm`."""
    folder = Path(path)
    manifest = read_manifest(folder)
    verify(folder, manifest, llm if manifest.get("version") == VERSION else None, namespace)
    return manifest


def restore_into(session: Any, path: str | Path, manifest: dict[str, Any]) -> None:
    """Load the checked snapshot at `path` (its manifest from `read_checked`) into a new `session`
    built with the manifest's memory config; SnapshotError when the shapes or files disagree."""
    folder = Path(path)
    want = {k: getattr(session.spec, k) for k in manifest["spec"]}
    if want != manifest["spec"]:
        raise SnapshotError(
            f"snapshot was written for a model shaped {manifest['spec']}, this model is {want}: "
            f"restore it with model '{manifest.get('model')}'"
        )
    if len(manifest["layers"]) != len(session.cache.layers):
        raise SnapshotError(
            f"snapshot at {folder} has {len(manifest['layers'])} layers, the model {len(session.cache.layers)}"
        )
    load = _load_v2 if manifest["version"] == VERSION else _load_v1
    try:
        states, extra = load(folder, manifest, len(session.cache.layers))
        for layer, state, meta in zip(session.cache.layers, states, manifest["layers"], strict=True):
            if "units.repr" not in state:  # no units yet
                state["units.repr"] = torch.empty(layer.spec.kv_heads, 0, layer.spec.head_dim)
            _check_shapes(layer, state, folder)
            layer.load_state(state, seen=meta["seen"], cut=meta["cut"], base=meta["base"])
            _check_counts(layer, meta, folder)
    except (KeyError, IndexError, ValueError, RuntimeError, SafetensorError) as exc:
        # what the checksums cannot catch: a version 1 snapshot, or tensors that never fit this model
        raise SnapshotError(f"snapshot at {folder} does not fit this model's memory: {exc!r:.200}") from exc
    if "last_logits" in extra:
        session.last_logits = extra["last_logits"].to(session.cache.layers[0].device)
    index = getattr(session, "text_index", None)
    if index is not None:
        stream = extra.get("stream_ids")
        if stream is not None and stream.numel() == session.cache.seen_tokens:
            index.write(0, stream.numpy())
        else:  # a snapshot without the stream's ids (older, or saved without an index): no text to index
            session.text_index = None
