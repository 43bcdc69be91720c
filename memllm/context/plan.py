"""The schedule of one model call through a context-memory layer, worked out on the host from integers.

Every layer of a ContextMemoryCache is in the same state (tokens seen, window length, phase, units),
so one CallPlan serves all layers of a call; its small device tensors are uploaded once per call.

Coordinates: the call's keys are appended to the window, giving W + c keys ("window coordinates",
key j); query t of the call is key W + t. Execution blocks end at absolute multiples of
exc_block_size. Block b's queries see window keys [lo_b, W + t] (causal) and, once a unit has been
cut (phase 2), the sinks and the units chosen among the first `units_before_b` units. After each
block, while the window minus its protected head (the first n_init tokens in phase 1, nothing in
phase 2) holds n_local + block_size tokens, its oldest block_size tokens become a unit. All units
cut in one call form one contiguous span of window coordinates, so they are written at once after
the call's local attention, before any lookup reads them.

Held calls (`hold=True`, what an answer that will be rolled back uses; cache.hold_cuts): a call whose
keys fit in the window's held limit, n_local + block_size + exc_block_size past its protected head,
cuts nothing, so its tokens stay in the window at exact positions; a call that does not fit follows
the rule above. Keys per query stay within the bound of cache.py either way. Knows nothing of
tensors' contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memllm.config import MemoryConfig


@dataclass(frozen=True)
class Block:
    q0: int  # first query of the block (call-relative)
    q1: int  # one past the last
    lo: int  # first window key its queries see
    cut_before: bool  # phase 2: sinks and units are visible
    units_before: int  # units the lookup may choose among


@dataclass
class CallPlan:
    seen: int  # tokens seen before the call
    window: int  # W: window length before the call
    c: int  # queries in the call
    blocks: list[Block]
    cut_start: int  # window coordinates of the units cut during the call: [cut_start, cut_start + n_cut*bs)
    n_cut: int
    sinks_from: (
        int | None
    )  # phase 1 -> 2 during this call: sinks are window keys [0, n_init) (None: no change)
    keep_from: int  # the window after the call is keys [keep_from, W + c)
    device_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def memory_blocks(self) -> list[int]:
        """Indices of the blocks that attend to memory (sinks + units)."""
        return [i for i, b in enumerate(self.blocks) if b.cut_before]

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-call int32 tables on `device`, built once per call and shared by all layers.

        row_lo (c,): first window key each query sees; row_block (c,): index among memory_blocks of its
        block, or -1; mb_q0 / mb_q1 / mb_units (len(memory_blocks),): rows and candidate units of each.
        """
        device = torch.device(device)
        if device not in self.device_tensors:
            row_lo, row_block = [], []
            mb = self.memory_blocks
            index = {b: i for i, b in enumerate(mb)}
            for i, b in enumerate(self.blocks):
                n = b.q1 - b.q0
                row_lo += [b.lo] * n
                row_block += [index.get(i, -1)] * n
            host = {
                "row_lo": torch.tensor(row_lo, dtype=torch.int32),
                "row_block": torch.tensor(row_block, dtype=torch.int64),
                "mb_q0": torch.tensor([self.blocks[i].q0 for i in mb], dtype=torch.int32),
                "mb_q1": torch.tensor([self.blocks[i].q1 for i in mb], dtype=torch.int32),
                "mb_units": torch.tensor([self.blocks[i].units_before for i in mb], dtype=torch.int64),
            }
            if device.type == "cuda":
                # Pinned staging, so the copies are asynchronous; kept alive with the plan.
                host = {k: v.pin_memory() for k, v in host.items()}
            self.device_tensors[device] = {k: v.to(device, non_blocking=True) for k, v in host.items()} | {
                f"host_{k}": v for k, v in host.items()
            }
        return self.device_tensors[device]


def cuts_first_unit(plan: CallPlan, cfg: MemoryConfig) -> bool:
    """Whether `plan` is a one-token call that cuts exactly the window's first unit (a decoded token
    that completes it): what the stacked and static steps attend as a steady step and then cut
    (ContextMemoryLayer.cut_after)."""
    return plan.c == 1 and plan.n_cut == 1 and plan.cut_start == 0 and plan.keep_from == cfg.block_size


def held_limit(cfg: MemoryConfig) -> int:
    """Window keys (past the protected head) a held call may reach without cutting."""
    return cfg.n_local + cfg.block_size + cfg.exc_block_size


def plan_call(
    seen: int, window: int, cut: bool, n_units: int, c: int, cfg: MemoryConfig, hold: bool = False
) -> CallPlan:
    """The schedule of a call of c tokens from this state (cfg resolved); `hold`: see the module note."""
    e, bs = cfg.exc_block_size, cfg.block_size
    held = hold and window + c - (0 if cut else cfg.n_init) <= held_limit(cfg)
    blocks: list[Block] = []
    ws = 0  # window start, window coordinates
    cut_start, n_cut_total = None, 0
    sinks_from = None
    start = 0
    while start < c:
        end = min(c, start + e - (seen + start) % e)
        blocks.append(Block(start, end, ws, cut, n_units + n_cut_total))
        head = 0 if cut else cfg.n_init
        n_cut = 0 if held else (window + end - ws - head - cfg.n_local) // bs
        if n_cut > 0:
            if cut_start is None:
                cut_start = ws + head
            if not cut:
                sinks_from = ws
                cut = True
            n_cut_total += n_cut
            ws = ws + head + n_cut * bs
        start = end
    return CallPlan(
        seen=seen,
        window=window,
        c=c,
        blocks=blocks,
        cut_start=cut_start if cut_start is not None else ws,
        n_cut=n_cut_total,
        sinks_from=sinks_from,
        keep_from=ws,
    )
