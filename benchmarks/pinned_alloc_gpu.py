"""Allocators for page-locked unit segments under a model-like load, on a GPU (a benchmark, synthetic).

30 stores with SmolLM2-135M's shapes (bf16 units, kv_heads 3, block 128, head_dim 64: 170 units per
8 MiB segment tensor, k and v per segment), fed like a model: each call appends the same number of
units (16-28, seeded) to every store, layer by layer, and per layer runs one UVA gather
(gather_units_uva) and bf16 matmuls calibrated to ~50 ms of GPU work per call in all. Allocators:
  pinned_sync          torch.empty(pin_memory=True) (cudaHostAlloc) in the calling thread, no prefetch
  pinned_prefetch      the same allocator, one segment ahead in SegmentPrefetch's worker threads
  registered_prefetch  pinned.registered_alloc (mmap, MADV_HUGEPAGE, pages touched, cudaHostRegister),
                       one segment ahead in the worker threads
Per call: host time (until the last launch of the call returns) and wall time (to a device sync).
Every call crossing a segment boundary takes a new segment in all 30 stores at once; the first call
allocates each store's first segment in the calling thread under every allocator.
Correctness, per run: units gathered through gather_units_uva equal UnitStore.gather_reference and
the appended units (exactly), and every segment tensor reports is_pinned().

All stores are kept until the end, so PyTorch's pinned-block cache never hands a later run the
blocks of an earlier one (each cudaHostAlloc is a real one); that needs ~20 GB of host memory with
the defaults (6 runs). Runs go through the allocators in order, then (--repeats 2) in reverse.
Usage: PYTHONPATH=. python benchmarks/pinned_alloc_gpu.py --out $OUT/pinned_alloc.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from memllm.context import pinned
from memllm.context.units import UnitStore

H, B, D, REPR = 3, 128, 64, 4
DEV = torch.device("cuda")
ALLOCATORS = ("pinned_sync", "pinned_prefetch", "registered_prefetch")


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def anon_huge_kib() -> int | None:
    """AnonHugePages of this process (kB), from /proc/self/smaps_rollup; None where unreadable."""
    text = read_text("/proc/self/smaps_rollup")
    for line in (text or "").splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


class AllocLog:
    """Wraps an allocator: (thread name, seconds) per call."""

    def __init__(self, alloc: pinned.HostAlloc) -> None:
        self.alloc, self.calls, self.lock = alloc, [], threading.Lock()

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = time.perf_counter()
        out = self.alloc(shape, dtype)
        dt = time.perf_counter() - t
        with self.lock:
            self.calls.append((threading.current_thread().name, dt))
        return out

    def summary(self) -> dict:
        out = {}
        for where in ("main", "workers"):
            ms = [dt * 1e3 for name, dt in self.calls if (name == "MainThread") == (where == "main")]
            if ms:
                out[where] = {"n": len(ms), "median_ms": statistics.median(ms), "max_ms": max(ms)}
        return out


def make_stores(kind: str, layers: int, log: AllocLog) -> list[UnitStore]:
    dev = DEV
    if kind == "pinned_sync":
        stores = [
            UnitStore(H, B, D, REPR, "bf16", dev, host_alloc=pinned.pinned_empty) for _ in range(layers)
        ]
        for s in stores:
            s._prefetch = None  # no prefetch: segments come from _host_empty, in the calling thread
            s._host_empty = log  # (shape, dtype) -> torch.empty(pin_memory=True), timed
        return stores
    return [UnitStore(H, B, D, REPR, "bf16", dev, host_alloc=log) for _ in range(layers)]


def calibrate(target_ms: float, layers: int, size: int) -> tuple[torch.Tensor, int, float]:
    """A (size, size) bf16 matrix and how many of its matmuls per layer give ~target_ms per call."""
    a = torch.randn(size, size, device=DEV, dtype=torch.bfloat16)
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    per_mm = (time.perf_counter() - t) / 20
    per_layer = max(1, round(target_ms / 1e3 / layers / per_mm))
    return a, per_layer, per_mm * 1e3


def run(kind: str, args, data, work) -> tuple[dict, list[UnitStore]]:
    k_all, v_all, counts, call_ids = data
    mat, per_layer = work
    log = AllocLog(pinned.pinned_empty if kind != "registered_prefetch" else pinned.registered_alloc)
    stores = make_stores(kind, args.layers, log)
    huge_before = anon_huge_kib()
    host, wall, boundary = [], [], []
    start = 0
    for c, n in enumerate(counts):
        ks, vs = k_all[start : start + n], v_all[start : start + n]
        rs = ks[:, :, :REPR]
        segs = len(stores[0].segments)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in stores:
            s.append_many(ks, vs, rs)
            if args.gather:
                gather_units(s, call_ids[c], torch.bfloat16)
            for _ in range(per_layer):
                mat @ mat
        host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
        boundary.append(len(stores[0].segments) > segs)
        start += n
    huge_after = anon_huge_kib()
    check = correctness(stores, k_all, start, args.seed)
    later = [x * 1e3 for x in host[1:]]
    bound = [host[i] * 1e3 for i in range(1, len(host)) if boundary[i]]
    after = [host[i + 1] * 1e3 for i in range(1, len(host) - 1) if boundary[i]]
    summary = {
        "allocator": kind,
        "first_call_host_ms": host[0] * 1e3,
        "host_median_ms": statistics.median(later),
        "host_max_ms": max(later),
        "boundary_calls": len(bound),
        "boundary_host_max_ms": max(bound) if bound else None,
        "after_boundary_host_max_ms": max(after) if after else None,
        "wall_median_ms": statistics.median(x * 1e3 for x in wall[1:]),
        "wall_total_s": sum(wall),
        "allocs": log.summary(),
        "anon_huge_kib_added": None if huge_before is None else huge_after - huge_before,
        "segments_per_store": len(stores[0].segments),
        **check,
        "per_call": {
            "units": counts,
            "host_ms": [x * 1e3 for x in host],
            "wall_ms": [x * 1e3 for x in wall],
            "boundary": boundary,
        },
    }
    return summary, stores


def gather_units(store: UnitStore, ids: torch.Tensor, dtype: torch.dtype):
    from memllm.context.cuda.gather import gather_units_uva

    return gather_units_uva(store, ids, dtype)


def correctness(stores: list[UnitStore], k_all: torch.Tensor, n: int, seed: int) -> dict:
    """Exact equality of the UVA gather, the reference gather and the appended units, on three stores."""
    torch.cuda.synchronize()
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    heads = torch.arange(H, device=DEV)[:, None]
    ok, pinned_ok = True, True
    for s in (stores[0], stores[len(stores) // 2], stores[-1]):
        pinned_ok &= all(t.is_pinned() for seg in s.segments for t in seg.values())
        ids = torch.randint(0, n, (H, 64), device=DEV, generator=gen)
        ids[:, 0], ids[:, 1] = 0, n - 1
        fast_k, fast_v = gather_units(s, ids, torch.bfloat16)
        ref_k, ref_v = s.gather_reference(ids, torch.bfloat16)
        want_k = k_all[ids, heads].reshape(H, 64 * B, D)
        ok &= bool(torch.equal(fast_k, ref_k) and torch.equal(fast_v, ref_v) and torch.equal(ref_k, want_k))
    return {"gather_matches_reference": ok, "segments_pinned": pinned_ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--min-units", type=int, default=16)
    ap.add_argument("--max-units", type=int, default=28)
    ap.add_argument("--gpu-ms", type=float, default=50.0, help="GPU matmul work per call (all layers)")
    ap.add_argument("--matmul-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2, help="2: the allocators in order, then in reverse")
    ap.add_argument("--no-gather", dest="gather", action="store_false", help="no UVA gather per layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()

    rng = random.Random(args.seed)
    counts = [rng.randint(args.min_units, args.max_units) for _ in range(args.calls)]
    total = sum(counts)
    gen = torch.Generator(device=DEV).manual_seed(args.seed)
    k_all = torch.randn(total, H, B, D, device=DEV, generator=gen).to(torch.bfloat16)
    v_all = torch.randn(total, H, B, D, device=DEV, generator=gen).to(torch.bfloat16)
    ends = [sum(counts[: c + 1]) for c in range(args.calls)]
    call_ids = [torch.randint(0, e, (H, 32), device=DEV, generator=gen) for e in ends]
    mat, per_layer, mm_ms = calibrate(args.gpu_ms, args.layers, args.matmul_size)

    # Warm-up (not timed): CUDA/cudart init, the capability query, the gather kernel's compilation,
    # the worker pool's threads, and one registered allocation.
    usable = pinned.host_pointers_usable()
    torch.cuda.cudart()
    warm = UnitStore(H, B, D, REPR, "bf16", DEV, segment_units=4, host_alloc=pinned.pinned_empty)
    warm.append_many(k_all[:9], v_all[:9], k_all[:9, :, :REPR])
    gather_units(warm, call_ids[0].clamp(max=8), torch.bfloat16)
    pinned.registered_alloc((4, 1 << 20), torch.float32)  # discarded at once: unregistered, unmapped
    torch.cuda.synchronize()

    order = list(ALLOCATORS) + (list(reversed(ALLOCATORS)) if args.repeats >= 2 else [])
    keep, runs = [warm], []
    data, work = (k_all, v_all, counts, call_ids), (mat, per_layer)
    for kind in order:
        summary, stores = run(kind, args, data, work)
        runs.append(summary)
        keep.append(stores)  # kept: PyTorch would hand a later run this run's freed pinned blocks
        print(json.dumps({k: v for k, v in summary.items() if k != "per_call"}), flush=True)

    props = torch.cuda.get_device_properties(0)
    result = {
        "benchmark": "pinned_alloc_gpu",
        "args": vars(args),
        "machine": {
            "device": props.name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "thp_enabled": read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
            "thp_defrag": read_text("/sys/kernel/mm/transparent_hugepage/defrag"),
            "host_pointers_usable": usable,
        },
        "gpu_work": {
            "matmul_size": args.matmul_size,
            "matmul_ms": mm_ms,
            "per_layer": per_layer,
            "per_call_ms_est": mm_ms * per_layer * args.layers,
        },  # fmt: skip
        "units_total": total,
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    print(
        f"\n{props.name}; THP {result['machine']['thp_enabled']}; GPU work ~{mm_ms * per_layer * args.layers:.0f} "
        f"ms/call; {args.layers} stores, {args.calls} calls, {total} units each.\n1st: host ms of call 0 "
        "(first segments, calling thread); median/max: host ms over calls 1..; bound.max / next.max: "
        "host ms max over calls taking new segments / the calls after them; total s: wall over all calls; "
        "hugeMiB: AnonHugePages added; ok: gather == reference == appended, segments pinned"
    )
    head = f"{'allocator':<20} {'1st':>7} {'median':>7} {'max':>7} {'bound.max':>9} {'next.max':>8} {'total s':>7} "
    print(head + f"{'alloc ms median (where n)':<36} {'hugeMiB':>7} ok")
    for r in runs:
        where = ", ".join(f"{v['median_ms']:.2f} ({k} {v['n']})" for k, v in r["allocs"].items())
        huge = "-" if r["anon_huge_kib_added"] is None else str(r["anon_huge_kib_added"] // 1024)
        ok = "yes" if r["gather_matches_reference"] and r["segments_pinned"] else "NO"
        print(
            f"{r['allocator']:<20} {ms(r['first_call_host_ms']):>7} {ms(r['host_median_ms']):>7} "
            f"{ms(r['host_max_ms']):>7} {ms(r['boundary_host_max_ms']):>9} "
            f"{ms(r['after_boundary_host_max_ms']):>8} {r['wall_total_s']:>7.2f} {where:<36} {huge:>7} {ok}"
        )


if __name__ == "__main__":
    main()
