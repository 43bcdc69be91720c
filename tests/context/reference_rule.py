"""A slow, obviously correct implementation of memllm's context-memory rule, for tests only.

Per layer it keeps the whole un-rotated K/V history and, for every query and head, builds the list of
keys the rule allows with their positions and does a dense softmax. The rule (memllm/context/cache.py):
execution blocks of exc_block_size queries aligned to absolute multiples; before any cut, plain
causal attention; afterwards local tokens [w, i] at positions (j - w) with the query at (i - w), plus
sinks [0, n_init) and the topk units by the sum over KV heads g of (sum of the block's queries of g's
heads rotated at distance(mem)) . (mean of g's repr keys * s) (same units for every head; per KV head when
mem.lookup == "per_head"), all at key position 0 with queries at distance(mem). After each block, while
T - c0 - block_size >= n_local (c0 = w once cut, else n_init), tokens [c0, c0 + block_size) become a
unit with representatives = the repr_topk tokens that received the most attention while local
(softmax over the local keys only, summed over the queries that saw them).
The model is called with position_ids = 0, so the keys it hands over are s * x (un-rotated).
"""

from __future__ import annotations

import torch

from memllm.config import MEMORY_DISTANCE, MemoryConfig


def distance(mem) -> int:
    """Where queries sit for sinks and units (keys at 0): memory_distance, unless set MEMORY_DISTANCE or n_local if
    shorter."""
    return mem.memory_distance if mem.memory_distance is not None else min(mem.n_local, MEMORY_DISTANCE)

class RuleReference:
    def __init__(self, model: torch.nn.Module, mem: MemoryConfig):
        self.mem = mem
        self.rotary = model.model.rotary_emb
        self.group = model.config.num_attention_heads // model.config.num_key_value_heads
        self.state: dict[int, dict] = {}
        self.chosen_log: list[
            tuple[int, int, dict[int, list[int]]]
        ] = []  # (layer, block start, {kv head: units})

    def cos_sin(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        cos, sin = self.rotary(torch.zeros(1, 1, d), torch.tensor([positions]))
        return cos[0].double(), sin[0].double()

    def rot(self, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """x (n, d) at positions (n,) -> rotated (rotate_half convention)."""
        cos, sin = self.cos_sin(positions)
        half = x.shape[-1] // 2
        rh = torch.cat([-x[:, half:], x[:, :half]], dim=-1)
        return x * cos + rh * sin

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        self.head_dim = query.shape[-1]
        s = self.cos_sin([0])[0][0]  # (d,): rotation at position 0 multiplies by s
        q_all = query[0].double() / s  # (H, c, d) un-rotated
        k_new = key[0].double() / s
        v_new = value[0].double()
        st = self.state.setdefault(
            module.layer_idx,
            {"K": k_new[:, :0], "V": v_new[:, :0], "recv": torch.zeros(k_new.shape[0], 0, dtype=torch.float64),
             "w": 0, "cut": False, "units": [], "repr": [], "layer": module.layer_idx},
        )  # fmt: skip
        e, c = self.mem.exc_block_size, query.shape[2]
        outs = []
        start = 0
        while start < c:
            a = st["K"].shape[1]
            end = min(c, start + e - a % e)
            outs.append(
                self.block(st, q_all[:, start:end], k_new[:, start:end], v_new[:, start:end], scaling, s)
            )
            start = end
        return torch.cat(outs, dim=1).transpose(0, 1).unsqueeze(0).to(query.dtype), None

    def block(self, st, q, k, v, scale, s):
        mem = self.mem
        a = st["K"].shape[1]
        st["K"] = torch.cat([st["K"], k], dim=1)
        st["V"] = torch.cat([st["V"], v], dim=1)
        st["recv"] = torch.cat([st["recv"], torch.zeros(k.shape[0], k.shape[1], dtype=torch.float64)], dim=1)
        heads, e, _ = q.shape
        w = st["w"]
        chosen = {}
        if st["cut"] and st["units"]:
            n_kv = st["K"].shape[0]
            per_head = []
            for g in range(n_kv):
                qsum = sum(
                    self.rot(q[h], [distance(mem)] * e).sum(0)
                    for h in range(g * self.group, (g + 1) * self.group)
                )
                per_head.append(
                    [
                        sum(float(qsum @ (r * s)) for r in st["repr"][u][g]) / mem.repr_topk
                        for u in range(len(st["units"]))
                    ]
                )
            for g in range(n_kv):
                if mem.lookup == "shared":
                    scores = [sum(per_head[h][u] for h in range(n_kv)) for u in range(len(st["units"]))]
                else:
                    scores = per_head[g]
                order = sorted(range(len(scores)), key=lambda u: (-scores[u], u))[: mem.topk]
                chosen[g] = sorted(order)
            self.chosen_log.append((st["layer"], a, chosen))
        out = torch.zeros(heads, e, q.shape[-1], dtype=torch.float64)
        for h in range(heads):
            g = h // self.group
            for i in range(e):
                qi = a + i
                local = list(range(w, qi + 1))
                q_loc = self.rot(q[h, i : i + 1], [qi - w])[0]
                k_loc = self.rot(st["K"][g, local], [j - w for j in local])
                logits = [k_loc @ q_loc * scale]
                vals = [st["V"][g, local]]
                if st["cut"]:
                    mem_tokens = list(range(mem.n_init))
                    for u in chosen.get(g, []):
                        mem_tokens += list(range(st["units"][u], st["units"][u] + mem.block_size))
                    q_mem = self.rot(q[h, i : i + 1], [distance(mem)])[0]
                    logits.append((st["K"][g, mem_tokens] * s) @ q_mem * scale)
                    vals.append(st["V"][g, mem_tokens])
                p = torch.softmax(torch.cat(logits), dim=0)
                out[h, i] = p @ torch.cat(vals)
                st["recv"][g, local] += torch.softmax(logits[0], dim=0)  # attention within the window
        total = a + e
        while True:
            c0 = st["w"] if st["cut"] else mem.n_init
            if total - c0 - mem.block_size < mem.n_local:
                break
            blk = list(range(c0, c0 + mem.block_size))
            reprs = []
            for g in range(st["K"].shape[0]):
                top = torch.topk(st["recv"][g, blk], mem.repr_topk).indices.tolist()
                reprs.append([st["K"][g, blk[t]] for t in top])
            st["units"].append(c0)
            st["repr"].append(reprs)
            st["w"] = c0 + mem.block_size
            st["cut"] = True
        return out
