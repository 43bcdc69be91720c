"""Question-driven selection: the units a question needs, found once and read by every layer.

InfLLM's rule (lookup.py) scores each unit by one summed query of an execution block against the
mean of a few representative keys, in each layer on its own. On real prose with similar needles it
picks the needle's unit in only a few layers, and a needle some layers miss is not answered; with
the needle's units forced into every layer (the oracle) answers match or beat full attention. So a
question is read twice (both readings rolled back, Session.answering):

1. the probe: the question is fed as usual, and every layer scores every unit of its memory by the
   attention mass the question's queries give it: for each query row and head, the softmax over the
   window (the local pass's log-sum-exp), the sinks and every key of every unit (all keys, read in
   chunks through the gather: token level, not representatives), summed over the unit's keys, then
   over heads and rows (`unit_mass`);
2. the masses are fused over layers (`fuse`: each layer's share of its own mass, summed), the best
   units and their neighbours are taken (`choose`), and these `topk` units are forced into every
   layer's lookup (`ForcedUnits`) while the question is fed again and the answer is generated.

`ForcedUnits` replaces a lookup's ids with the forced ones by a device-side select on a device flag,
so captured decode graphs (graph.py) obey it without a new capture. The oracle is the same forcing
with the gold evidence's units first (`units_of_spans`); `recall_by_layer` reads a lookup log
(cache.record_lookups) against them. Knows nothing of text or models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memllm.context.units import UnitStore

Gather = Callable[[UnitStore, torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]

# The probe's scan reads units in chunks whose logits ((heads, rows, units * block_size) fp32) stay under
# SCAN_BYTES, and never more than SCAN_UNITS units. With 1,024-unit chunks and no byte cap, the H200 run
# of Qwen2.5-Coder-0.5B at 512K peaked at 3.06 GiB against 1.60 GiB for passkey at 1M (run 24). With 64 MB of
# logits, SmolLM2's question at 1M peaked at 1.063 GiB against 0.689 for the read (run 31: the logits, logsumexp's
# temporaries and the keys' fp32 copy, by reckoning; an fp16 MiniLM changed nothing), hence 16 MB (not yet re-measured).
SCAN_UNITS = 1024
SCAN_BYTES = 16 << 20


Scan = Callable[[torch.Tensor, UnitStore, float], torch.Tensor]


def unit_lse(
    q: torch.Tensor, store: UnitStore, scale: float, dtype: torch.dtype, gather: Gather, chunk: int | None = None
) -> torch.Tensor:
    """The probe's scan, reference: q (kv_heads, rows, d) fp32 -> (kv_heads, rows, n_units) fp32, every
    unit's log-sum-exp of scale * q . k over its block_size keys.

    The units' keys are read `chunk` units at a time (default: SCAN_BYTES of logits) through `gather`
    (the cache's kernels.gather_units: on CUDA from pinned host memory by device-side ids, in `dtype`),
    so device memory stays bounded by the chunk. The kernels' scan_units is this on the CPU, and one
    Triton launch on CUDA (cuda/select.py)."""
    kvh, rows, _ = q.shape
    n, bs = store.n_units, store.block_size
    if chunk is None:
        chunk = max(1, min(SCAN_UNITS, SCAN_BYTES // (kvh * rows * bs * 4)))
    out = torch.empty(kvh, rows, n, dtype=torch.float32, device=q.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        ids = torch.arange(lo, hi, device=q.device).expand(1, kvh, -1)
        k, v = gather(store, ids, dtype)  # (1, kvh, (hi - lo) * bs, d)
        del v  # each buffer is freed as soon as it is used: the scan's peak is one step's, not two chunks'
        kf = k[0].float()
        del k
        logits = torch.matmul(q, kf.transpose(1, 2))  # (kvh, rows, (hi - lo) * bs)
        del kf
        logits.mul_(scale)
        out[:, :, lo:hi] = torch.logsumexp(logits.view(kvh, rows, hi - lo, bs), dim=-1)
        del logits
    return out


def unit_mass(
    q_mem: torch.Tensor,
    lse_window: torch.Tensor,
    sink_k: torch.Tensor,
    store: UnitStore,
    scale: float,
    scan: Scan,
) -> torch.Tensor:
    """q_mem (heads, m, d) the question's queries at the memory frame (keys at position 0, queries at
    n_local); lse_window (heads, m) their log-sum-exp over the window -> (m, n_units) fp32: per row, the
    attention mass (summed over heads) that every unit would receive in one softmax over window,
    sinks and all units. scan(q (kv_heads, rows, d) fp32, store, scale) -> (kv_heads, rows, n_units): each
    unit's log-sum-exp (the cache's kernels.scan_units; unit_lse is its reference)."""
    heads, m, d = q_mem.shape
    kvh = store.kv_heads
    g = heads // kvh
    n = store.n_units
    q = q_mem.float().reshape(kvh, g * m, d)
    parts = [lse_window.float().reshape(kvh, g * m)]
    if sink_k.shape[1]:
        parts.append(torch.logsumexp(torch.matmul(q, sink_k.float().transpose(1, 2)) * scale, dim=-1))
    unit_lse = scan(q, store, scale)
    if n:
        parts.append(torch.logsumexp(unit_lse, dim=-1))
    total = torch.logsumexp(torch.stack(parts), dim=0)  # (kvh, g*m)
    mass = torch.exp(unit_lse - total.unsqueeze(-1))  # (kvh, g*m, n)
    return mass.reshape(heads, m, n).sum(dim=0)


class Probe:
    """Per-layer unit masses of the question fed while it is active (ContextMemoryCache.probing)."""

    def __init__(self, num_layers: int, n_units: int):
        self.n_units = n_units  # units before the probe: those it may choose (later ones are rolled back)
        self.masses: list[torch.Tensor | None] = [None] * num_layers  # (rows, n_units) per layer

    def add(self, layer_idx: int, mass: torch.Tensor) -> None:
        mass = mass[:, : self.n_units]
        prev = self.masses[layer_idx]
        self.masses[layer_idx] = mass if prev is None else torch.cat([prev, mass], dim=0)

    def per_layer(self, rows: int | None = None) -> torch.Tensor | None:
        """(layers, n_units): each layer's mass over its last `rows` question rows (all by default);
        None when no layer had a memory pass (nothing cut yet)."""
        got = [m for m in self.masses if m is not None]
        if not got:
            return None
        return torch.stack([(m if rows is None else m[-rows:]).sum(dim=0) for m in got])


def fuse(per_layer: torch.Tensor) -> torch.Tensor:
    """(layers, n_units) masses -> (n_units,): each layer's share of its own mass, summed over layers
    (a layer whose heads look at the window does not drown one that retrieves)."""
    return (per_layer / per_layer.sum(dim=1, keepdim=True).clamp_min(1e-30)).sum(dim=0)


def standardized_sum(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several (n_units,) scores -> one: each standardised (minus its mean, over its standard
    deviation), then summed. A score that singles out a few units (the question's attention on a
    needle) keeps them on top; where it is flat (a paragraph the question paraphrases), the other
    (the text index's cosine) decides."""
    out = torch.zeros_like(scores[0], dtype=torch.float32)
    for s in scores:
        s = s.float()
        if s.numel() != out.numel():
            raise ValueError(f"scores of different lengths: {[x.numel() for x in scores]}")
        out += (s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else s * 0
    return out


# The text supports the attention's best unit when that unit (or a neighbour) is the text's best, or
# its text score stands AGREE_Z standard deviations above the mean over all units: a relative test,
# which holds however many near-duplicates of the evidence the text ranks beside it (the choice and
# the test it replaced: benchmarks/RESULTS.md, "The switch, now the default selector").
AGREE_Z = 3.0


def hybrid(mass: torch.Tensor, text: torch.Tensor, z: float = AGREE_Z) -> torch.Tensor:
    """The question's fused attention mass and the text index's cosine (n_units,) -> one ranking.

    Where the text supports the attention's best unit (`agrees`), both point at the same evidence (a
    needle found): the attention ranking alone, since the text would add the evidence's near-duplicates
    (distractor needles), which the model then copies. Elsewhere (a paragraph the question paraphrases,
    which the attention ranks low) the log of the mass and the cosine, standardised and summed: the
    log because the mass's heavy tail would otherwise set the scale and flatten the text's ranking.
    Measured: benchmarks/RESULTS.md, "The text index by windows"."""
    if agrees(mass, text, z):
        return mass
    return standardized_sum([mass.clamp_min(1e-9).log(), text])


def agrees(mass: torch.Tensor, text: torch.Tensor, z: float = AGREE_Z) -> bool:
    """Whether the text supports the attention's best unit: that unit or a neighbour is the text's
    best, or its text score is at least `z` standard deviations above the mean text score of all
    units. The second is relative: it holds however many near-duplicates of the evidence the text
    ranks beside it."""
    n = text.numel()
    t = text.float()
    best = int(mass.argmax())
    if n < 2 or abs(int(t.argmax()) - best) <= 1:
        return True
    near = t[max(0, best - 1) : min(n, best + 2)].max()
    return bool(near - t.mean() >= z * t.std().clamp_min(1e-12))


# The share of the topk slots that the fused ranking (`hybrid`) fills with its best units and their
# neighbours; the rest go to the question's attention ranking alone (`evidence_then_attention`).
EVIDENCE_SHARE = 0.75


def evidence_then_attention(
    ranked: torch.Tensor,
    mass: torch.Tensor,
    k: int,
    neighbours: int = 1,
    first: Sequence[int] = (),
    share: float = EVIDENCE_SHARE,
) -> torch.Tensor:
    """The k units to read: `first`, then the fused ranking's best units with their neighbours up to
    `share` of k (the evidence), then the question's attention mass alone (`choose`) -> (k,) long.

    The fused ranking brings the units whose text matches the question; past its best few these are
    the evidence's near-duplicates (other needles, similar paragraphs), which a small model answers
    from. The attention's own ranking fills the rest with the units every question looks at (the
    stream's start, recurring passages): what the oracle reads beside the gold units."""
    n_evidence = max(1, min(k, round(k * share)))
    evidence = choose(ranked, n_evidence, neighbours, first=first).tolist()
    given = set(first)
    lead = list(first) + [u for u in evidence if u not in given]
    return choose(mass, k, neighbours, first=lead)


# The lexical tier (selector "lexical", the default): the units whose rare-word score (memllm/unit_lexical.py)
# is within LEXICAL_MARGIN (a share of the best) of the best. Chosen by offline replays, kept by answers on the
# GPU (benchmarks/RESULTS.md, "The lexical selector in answers"); ranking the tier's near-duplicates last
# (an opt-in "lexical_near") answered no better (110.8 vs 111.0 at 32K) and was removed.
LEXICAL_MARGIN = 0.1


def lexical_tier(lexical: torch.Tensor, cap: int, margin: float = LEXICAL_MARGIN) -> list[int]:
    """The units whose lexical score is within `margin` (a share of the best) of the best, best first (ties
    by unit); none when more than `cap` units are (the words single out no few units) or no unit holds a
    word of the question."""
    s = lexical.detach().float().cpu()
    best = float(s.max()) if s.numel() else 0.0
    if best <= 0:
        return []
    tier = (s >= best * (1 - margin)).nonzero().flatten().tolist()
    return [] if len(tier) > cap else sorted(tier, key=lambda u: (-float(s[u]), u))


def lexical_lead(
    lexical: torch.Tensor,
    held: torch.Tensor,
    k: int,
    neighbours: int = 1,
    first: Sequence[int] = (),
    share: float = EVIDENCE_SHARE,
    *,
    sides: torch.Tensor | None = None,
    reach: torch.Tensor | None = None,
) -> tuple[list[int], bool]:
    """`lexical_evidence`'s lead, in reading order: `first`, then the tier's units, then the neighbour each
    tier unit's words lie against (`sides`), then the units their paragraph goes on into (`reach`), then
    their other `neighbours`, up to `share` of k; and whether the tier's units together hold every rare word
    of the question (then the attention alone fills the rest)."""
    n = lexical.numel()
    n_evidence = max(1, min(k, round(k * share)))
    tier = lexical_tier(lexical, n_evidence)
    lead = list(dict.fromkeys(int(u) for u in first))
    cap = max(n_evidence, len(first))
    side = None if sides is None else sides.cpu().tolist()  # one read of the sides, not one per tier unit
    toward = [u + side[u] for u in tier if side[u]] if neighbours and side is not None else []
    spans = reach.cpu()[tier].tolist() if neighbours and reach is not None and tier else []
    far = max((r for pair in spans for r in pair), default=0)
    paragraph = [  # nearest first over the whole tier: every tier unit's next units before any unit two away
        u + s * j for j in range(1, far + 1) for u, (b, a) in zip(tier, spans, strict=True) for s, r in ((1, a), (-1, b)) if j <= r
    ]
    around = [u + s * j for u in tier for j in range(1, neighbours + 1) for s in (-1, 1)]
    for v in [*tier, *toward, *paragraph, *around]:  # every tier unit before any neighbour: a small topk reads them all
        if 0 <= v < n and v not in lead and len(lead) < cap:
            lead.append(v)
    covers = bool(tier) and held.shape[1] > 0 and bool(held.cpu()[tier].any(dim=0).all())
    return lead, covers


def lexical_evidence(
    ranked: torch.Tensor,
    mass: torch.Tensor,
    lexical: torch.Tensor,
    held: torch.Tensor,
    k: int,
    neighbours: int = 1,
    first: Sequence[int] = (),
    share: float = EVIDENCE_SHARE,
    *,
    sides: torch.Tensor | None = None,
    reach: torch.Tensor | None = None,
) -> torch.Tensor:
    """`evidence_then_attention` with the lexical tier first: `first`, then the tier's units, then the
    neighbour each tier unit's words lie against (`sides`, UnitTextIndex.lexical_sides: +1 the next unit,
    -1 the previous, 0 none), then the units the paragraph of each tier unit's words goes on into (`reach`,
    (n_units, 2): units before and after, UnitTextIndex.paragraph_reach; the next ones of every tier unit
    before those two away, after before before), then their other `neighbours` (tier order), up to `share`
    of k (`lexical_lead`). Where the
    tier's units together hold every rare word of the question, that is the evidence and the attention
    fills the rest (as the oracle's gold units); elsewhere the fused ranking's evidence and the attention
    follow as in `evidence_then_attention`. Where there is no tier: `evidence_then_attention` itself.
    held: (n_units, words) bool, the question's rare words each unit's best window holds."""
    lead, covers = lexical_lead(lexical, held, k, neighbours, first, share, sides=sides, reach=reach)
    if covers:
        return choose(mass, k, neighbours, first=lead)
    return evidence_then_attention(ranked, mass, k, neighbours, first=lead, share=share)


def choose(score: torch.Tensor, k: int, neighbours: int = 1, first: Sequence[int] = ()) -> torch.Tensor:
    """The k units to read: `first` (the oracle's gold units), then units by descending score, each
    followed by its `neighbours` on either side (evidence cut across a unit border), then by score
    alone -> (k,) long ascending, on score's device. Needs k <= score.numel()."""
    n = score.numel()
    order = torch.argsort(score.detach().float().cpu(), descending=True, stable=True).tolist()
    picked: list[int] = []
    seen: set[int] = set()

    def take(u: int) -> None:
        if 0 <= u < n and u not in seen and len(picked) < k:
            seen.add(u)
            picked.append(u)

    for u in first:
        take(int(u))
    for u in order:
        if len(picked) >= k:
            break
        take(u)
        for j in range(1, neighbours + 1):
            take(u - j)
            take(u + j)
    for u in order:
        take(u)
    return torch.tensor(sorted(picked), dtype=torch.long, device=score.device)


class ForcedUnits:
    """The unit ids every layer's lookup reads while forcing is on, in fixed device buffers.

    `apply` is a device-side select on a device flag, so a captured graph that ran it obeys later
    changes of the flag and ids without a new capture (graph.py)."""

    def __init__(self, num_layers: int, topk: int, device: torch.device):
        self.topk = topk
        self.ids = torch.zeros(num_layers, topk, dtype=torch.long, device=device)
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.active = False  # the host's view of flag

    def set(self, ids: torch.Tensor) -> None:
        """ids (topk,) for every layer, or (layers, topk)."""
        if ids.shape[-1] != self.topk:
            raise ValueError(f"forcing needs exactly topk={self.topk} ids, got {ids.shape[-1]}")
        self.ids.copy_(ids.to(self.ids.device).expand_as(self.ids))
        self.flag.fill_(True)
        self.active = True

    def clear(self) -> None:
        self.flag.fill_(False)
        self.active = False

    def apply(self, layer_idx: int, ids: torch.Tensor, static: bool = False) -> torch.Tensor:
        """A lookup's ids (blocks, rows, t) -> the forced ids where forcing is on (t == topk), else ids.
        static (inside a graph): always the device select; eager: only while active."""
        if ids.shape[-1] != self.topk or not (static or self.active):
            return ids
        return torch.where(self.flag, self.ids[layer_idx].view(1, 1, -1), ids)


def units_of_spans(spans: Sequence[tuple[int, int]], n_init: int, block_size: int, n_units: int) -> list[int]:
    """Token spans [start, end) of the stream -> the ids of the units holding them (sinks and the
    window excluded), in order. Unit u holds tokens n_init + u*block_size ... + block_size - 1."""
    out: list[int] = []
    for start, end in spans:
        lo = max(start, n_init)
        if end <= lo:
            continue
        for u in range((lo - n_init) // block_size, (end - 1 - n_init) // block_size + 1):
            if u < n_units and u not in out:
                out.append(u)
    return out


def recall_by_layer(
    log: Sequence[tuple[int, torch.Tensor]], gold: Sequence[int], num_layers: int
) -> list[float | None]:
    """A lookup log (layer, ids) and gold unit ids -> per layer, the share of gold units that the
    layer's lookups read (any of them), None for a layer without lookups (or when gold is empty)."""
    read: list[set[int] | None] = [None] * num_layers
    for layer, ids in log:
        got = read[layer] if read[layer] is not None else set()
        got.update(int(u) for u in ids.reshape(-1).tolist())
        read[layer] = got
    if not gold:
        return [None] * num_layers
    return [None if r is None else sum(u in r for u in gold) / len(gold) for r in read]
