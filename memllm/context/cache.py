"""ContextMemoryCache: a transformers Cache of per-layer context memories (InfLLM-style).

Per layer (ContextMemoryLayer); see positions.py for how rotations are undone and redone:
  sinks   (kv_heads, n_init, head_dim)   first n_init tokens, un-rotated, fixed distance once cutting began
  local   (kv_heads, L, head_dim)        the window, keys rotated at (j - base): exact relative positions;
                                         re-rotated ("rebased") before a position would reach the trained length
  units   UnitStore                      cut blocks of block_size tokens, K/V off the device

The rule, per execution block of queries (aligned to absolute multiples of exc_block_size):
  * phase 1 (nothing cut yet): local holds every token, sinks included: plain causal attention.
  * phase 2: each query attends to the local window (exact positions, causal) and to sinks + the
    topk units chosen by lookup.py for the block (shared by all KV heads, or per KV head), keys at
    position 0 and queries at n_local; one softmax over both (merge.py).
  * after each block, while the window minus a block still holds n_local tokens, its oldest
    block_size tokens become a unit whose representatives are the repr_topk keys that received most
    attention while in the window (in phase 1 the first n_init tokens become the sinks then).
Keys attended per query <= n_init + topk*block_size + n_local + block_size + exc_block_size.

`update` only records the new K/V; the attention function (attention.py) calls `layer.attend`,
which computes the block outputs and advances the state. get_seq_length() reports
min(tokens seen, n_init + n_local), so model positions stay bounded; `seen_tokens` is the truth.
Not supported: batch size > 1, beam search, crop (use checkpoint()/rollback()), HF `generate()`
(its position bookkeeping assumes a plain cache; use memllm.context.prefill or Session). There is no
device-side LRU of units yet: the CUDA gather reads the selected units from pinned host memory on
every lookup (MemoryConfig.max_cached_blocks is accepted and unused). Knows nothing of the model
beyond ModelSpec.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memllm.config import MemoryConfig
from memllm.context.gather import gather_units
from memllm.context.lookup import combine, select_units, select_units_reference, unit_scores
from memllm.context.merge import merged_attention, merged_attention_fused
from memllm.context.positions import Rotary
from memllm.context.support import ModelSpec
from memllm.context.units import UnitStore
from memllm.errors import ConfigError


class ContextMemoryLayer(CacheLayerMixin):
    """One layer's sinks, window, window scores and units."""

    is_sliding = False
    is_croppable = False

    def __init__(self, spec: ModelSpec, config: MemoryConfig, rotary: Rotary, layer_idx: int):
        super().__init__()
        self.spec, self.config, self.rotary, self.layer_idx = spec, config, rotary, layer_idx
        self.device = spec.device
        self.dtype = spec.dtype
        self.store = UnitStore(
            spec.kv_heads,
            config.block_size,
            spec.head_dim,
            config.repr_topk,
            config.offload_dtype,
            self.device,
        )
        h, d = spec.kv_heads, spec.head_dim
        empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
        self.sink_k, self.sink_v = empty, empty
        self.local_k, self.local_v = empty, empty
        self.local_score = torch.empty(h, 0, dtype=torch.float32, device=self.device)  # (kv_heads, L)
        self.seen = 0
        self.base = 0  # absolute index of window position 0: local key j is kept rotated at j - base
        self.cut = False  # phase 2 once a unit has been cut
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lookups = 0
        self.units_fetched = 0
        self.max_keys_per_query = 0
        self.max_position = 0
        self.is_initialized = True

    # ---- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new (rotated) K/V for the attention function; the state advances in `attend`."""
        self.pending = (key_states, value_states)
        return key_states, value_states

    def reported_length(self) -> int:
        return min(self.seen, self.config.n_init + self.config.n_local)

    def model_positions(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) the positions the model rotates the next n tokens at (reported length + arange)."""
        self.check_positions(n)
        start = self.reported_length()
        return torch.arange(start, start + n, device=device)

    def check_positions(self, n: int) -> None:
        """Refuse a model call whose positions would reach the trained length (host integers only)."""
        start = self.reported_length()
        if start + n > self.spec.trained_len:
            raise RuntimeError(
                f"position {start + n - 1} is beyond the model's trained length ({self.spec.trained_len}): "
                f"feed at most {self.spec.trained_len - start} tokens per call (memllm.context.prefill.feed does)"
            )

    def get_seq_length(self) -> int:
        return self.reported_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.reported_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.restore_checkpoint(self.empty_checkpoint())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("ContextMemoryCache holds one sequence: beam search is not supported")

    def offload(self):
        pass

    def prefetch(self):
        pass

    # ---- the rule ------------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query (1, heads, c, d), key/value (1, kv_heads, c, d) rotated by the model at the positions
        `model_positions(c)` gives (what the cache reported: HF's default position ids).

        Returns (1, heads, c, d) in the model dtype and advances the state by c tokens.
        """
        if query.shape[0] != 1:
            raise ValueError("ContextMemoryCache supports batch size 1 only")
        c = query.shape[2]
        model_start = self.reported_length()
        self.check_positions(c)
        self.max_position = max(self.max_position, model_start + c - 1)
        v = value[0].to(self.dtype)
        outs = []
        e = self.config.exc_block_size
        start = 0
        while start < c:
            end = min(c, start + e - self.seen % e)
            q, k = query[0, :, start:end], key[0, :, start:end]
            outs.append(self._attend_block(q, k, v[:, start:end], scale, model_start + start))
            self._evict()
            start = end
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.unsqueeze(0).to(query.dtype)

    def _rebase(self, new_base: int) -> None:
        """Re-rotate the window so that its positions count from `new_base` (keeps them < trained length)."""
        self.local_k = self.rotary.rotate_const(self.local_k, self.base - new_base).to(self.dtype)
        self.base = new_base

    def _attend_block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, model_start: int
    ) -> torch.Tensor:
        """One execution block: q (heads, e, d), k (kv_heads, e, d) as rotated by the model at
        model_start + t; v (kv_heads, e, d). Returns (heads, e, d) fp32."""
        cfg, rot = self.config, self.rotary
        e, d = q.shape[1], q.shape[2]
        n_prev = self.local_k.shape[1]
        if self.seen + e - 1 - self.base >= self.spec.trained_len:
            self._rebase(self.seen - n_prev)
        dev = q.device
        shift = self.seen - self.base - model_start  # model position -> window position, same for all t
        cos_l, sin_l, _ = rot.tables(dev)
        row = rot._row(shift)
        k_loc = torch.cat([self.local_k, rot.apply(k, cos_l[row], sin_l[row]).to(self.dtype)], dim=1)
        v_loc = torch.cat([self.local_v, v], dim=1)
        q_mem = k_mem = v_mem = None
        if self.cut:
            # Both rotations of the queries at once: (heads, e, 2, d) = [window position, fixed distance].
            cos_m, sin_m = rot.cos_sin(model_start - cfg.n_local, e, -1, dev)  # n_local - (model_start + t)
            cos2 = torch.stack([cos_l[row].expand(e, d), cos_m], dim=1)
            sin2 = torch.stack([sin_l[row].expand(e, d), sin_m], dim=1)
            q_pair = rot.apply(q.unsqueeze(2), cos2, sin2)
            q_loc, q_mem = q_pair[:, :, 0], q_pair[:, :, 1]
            mem_k, mem_v = [self.sink_k], [self.sink_v]
            if self.store.n_units > 0 and cfg.topk > 0:
                ids = self.lookup(q_mem)
                uk, uv = gather_units(self.store, ids, self.dtype, cfg.impl)
                mem_k.append(uk)
                mem_v.append(uv)
                self.lookups += 1
                self.units_fetched += ids.numel()
            k_mem = torch.cat(mem_k, dim=1)  # kept rotated at position 0
            v_mem = torch.cat(mem_v, dim=1)
        else:
            q_pair = None
            q_loc = rot.apply(q, cos_l[row], sin_l[row])
        n_mem = 0 if k_mem is None else k_mem.shape[1]
        self.max_keys_per_query = max(self.max_keys_per_query, n_mem + n_prev + e)
        self.max_position = max(
            self.max_position, self.seen + e - 1 - self.base, cfg.n_local if self.cut else 0
        )
        if cfg.impl == "reference":
            out, received = merged_attention(
                q_loc, k_loc, v_loc, q_mem, k_mem, v_mem, scale, n_prev, torch.float32
            )
        else:
            compute = torch.float32 if dev.type == "cpu" else self.dtype
            out, received = merged_attention_fused(
                q_loc, k_loc, v_loc, q_mem, k_mem, v_mem, scale, n_prev, compute, q_pair=q_pair
            )
        self.local_k, self.local_v = k_loc, v_loc
        self.local_score = torch.cat([self.local_score + received[:, :n_prev], received[:, n_prev:]], dim=1)
        self.seen += e
        return out

    def lookup(self, q_mem: torch.Tensor) -> torch.Tensor:
        """q_mem (heads, e, d) rotated at the fixed distance -> unit ids (kv_heads, <=topk) on the device."""
        heads, _, d = q_mem.shape
        kvh = self.spec.kv_heads
        q_sum = q_mem.reshape(kvh, heads // kvh, -1, d).sum(dim=(1, 2))  # (kv_heads, d)
        scores = combine(unit_scores(q_sum, self.store.repr_keys()), self.config.lookup)
        if self.config.impl == "reference":
            ids = select_units_reference(scores, self.config.topk)
        else:
            ids = select_units(scores, self.config.topk)
        return ids.expand(kvh, -1)

    def _evict(self) -> None:
        """Cut every block that leaves the window (all at once; each block's representatives are its own)."""
        cfg = self.config
        bs = cfg.block_size
        start = 0 if self.cut else cfg.n_init
        n_cut = (self.local_k.shape[1] - start - cfg.n_local) // bs
        if n_cut <= 0:
            return
        kvh, n_win, d = self.local_k.shape
        first = self.seen - n_win - self.base  # position of the window's first key
        rot = self.rotary
        span = slice(start, start + n_cut * bs)
        # Units keep keys rotated at position 0: rotate back by their window positions.
        k_blk = rot.rotate(self.local_k[:, span], first + start, -1).to(self.dtype).reshape(kvh, n_cut, bs, d)
        v_blk = self.local_v[:, span].reshape(kvh, n_cut, bs, d)
        top = torch.topk(self.local_score[:, span].reshape(kvh, n_cut, bs), cfg.repr_topk, dim=2).indices
        repr_k = torch.gather(k_blk, 2, top.unsqueeze(-1).expand(-1, -1, -1, d))  # (kv_heads, n_cut, r, d)
        self.store.append_many(k_blk.transpose(0, 1), v_blk.transpose(0, 1), repr_k.transpose(0, 1))
        if not self.cut:
            if start:
                self.sink_k = rot.rotate(self.local_k[:, :start], first, -1).to(self.dtype)
                self.sink_v = self.local_v[:, :start].clone()
            self.cut = True
        rest = slice(start + n_cut * bs, None)
        # Compact copies: a slice would pin the old storage.
        self.local_k = self.local_k[:, rest].contiguous()
        self.local_v = self.local_v[:, rest].contiguous()
        self.local_score = self.local_score[:, rest].contiguous()

    # ---- checkpoints, accounting, snapshots ------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {
            "sink_k": self.sink_k, "sink_v": self.sink_v, "local_k": self.local_k, "local_v": self.local_v,
            "local_score": self.local_score, "seen": self.seen, "cut": self.cut, "n_units": self.store.n_units,
            "base": self.base,
        }  # fmt: skip

    def empty_checkpoint(self) -> dict:
        h, d = self.spec.kv_heads, self.spec.head_dim
        empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
        score = torch.empty(h, 0, dtype=torch.float32, device=self.device)
        return {"sink_k": empty, "sink_v": empty, "local_k": empty, "local_v": empty, "local_score": score,
                "seen": 0, "cut": False, "n_units": 0, "base": 0}  # fmt: skip

    def restore_checkpoint(self, cp: dict) -> None:
        """Roll back to a checkpoint taken earlier (tensors are never modified in place, units only appended)."""
        self.sink_k, self.sink_v = cp["sink_k"], cp["sink_v"]
        self.local_k, self.local_v, self.local_score = cp["local_k"], cp["local_v"], cp["local_score"]
        self.seen, self.cut, self.base = cp["seen"], cp["cut"], cp["base"]
        self.store.truncate(cp["n_units"])

    def device_bytes(self) -> dict[str, int]:
        window = sum(
            t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.local_k, self.local_v)
        )
        window += self.local_score.numel() * 4
        return {"window": window, "index": self.store.device_bytes()}

    def state(self) -> dict[str, torch.Tensor]:
        out = {name: t.to("cpu").contiguous() for name, t in self.checkpoint().items() if torch.is_tensor(t)}
        out.update({f"units.{name}": t for name, t in self.store.state().items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor], seen: int, cut: bool, base: int) -> None:
        dev = self.device
        self.sink_k, self.sink_v = state["sink_k"].to(dev), state["sink_v"].to(dev)
        self.local_k, self.local_v = state["local_k"].to(dev), state["local_v"].to(dev)
        self.local_score = state["local_score"].to(dev)
        self.seen, self.cut, self.base = seen, cut, base
        self.store.load_state({k[len("units.") :]: t for k, t in state.items() if k.startswith("units.")})


class ContextMemoryCache(Cache):
    """A Cache of ContextMemoryLayer, one per decoder layer. Use through `attach` (attach.py)."""

    def __init__(self, spec: ModelSpec, config: MemoryConfig):
        resolved = config.resolved(spec.trained_len)
        if resolved.device is not None and torch.device(resolved.device) != spec.device:
            raise ConfigError(
                f"MemoryConfig.device ({resolved.device}) must be where the model is ({spec.device}): "
                "move the model, or leave device unset"
            )
        rotary = Rotary(spec.rotary, spec.trained_len, spec.head_dim)
        layers = [ContextMemoryLayer(spec, resolved, rotary, i) for i in range(spec.num_layers)]
        super().__init__(layers=layers)
        self.spec, self.config, self.rotary = spec, resolved, rotary

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen

    def next_position_ids(self, n: int) -> torch.Tensor:
        """(1, n) position ids the model should be called with next (what HF derives by default)."""
        return self.layers[0].model_positions(n, self.layers[0].device).unsqueeze(0)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ContextMemoryCache cannot crop: use checkpoint()/rollback()")

    def checkpoint(self) -> list[dict]:
        return [layer.checkpoint() for layer in self.layers]

    def rollback(self, checkpoint: list[dict]) -> None:
        for layer, cp in zip(self.layers, checkpoint, strict=True):
            layer.restore_checkpoint(cp)

    def stats(self) -> dict:
        dev = [layer.device_bytes() for layer in self.layers]
        return {
            "tokens_seen": self.seen_tokens,
            "units": sum(layer.store.n_units for layer in self.layers),
            "units_per_layer": self.layers[0].store.n_units,
            "device_bytes_window": sum(d["window"] for d in dev),
            "device_bytes_index": sum(d["index"] for d in dev),
            "host_bytes": sum(layer.store.host_bytes() for layer in self.layers),
            "host_bytes_stored": sum(layer.store.stored_bytes() for layer in self.layers),
            "lookups": sum(layer.lookups for layer in self.layers),
            "units_fetched": sum(layer.units_fetched for layer in self.layers),
            "max_keys_per_query": max(layer.max_keys_per_query for layer in self.layers),
            "max_position": max(layer.max_position for layer in self.layers),
        }
