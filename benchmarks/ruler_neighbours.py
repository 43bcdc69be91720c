"""Offline replay (issue 25): the evidence's neighbours taken on the side where the unit's best text window
crosses its border (direction-aware) against one neighbour each side (`select.evidence_then_attention`).
The run's logged attention masses, the text index recomputed from the suite on the CPU (~25 min at 32K on
2 busy cores). Per family: every gold unit read / mean share of gold units read / share of the oracle's units.

    python benchmarks/ruler_neighbours.py benchmarks/results/ruler_qwen_32k_windows.json.gz .gpu/suite_qwen_32k.json.gz 32768 \
        ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights
"""

import collections
import gzip
import json
import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer

from memllm.context import select
from memllm.memory_stores.embeddings import SentenceTransformerEmbedder
from memllm.unit_text import UnitTextIndex

logs, suite, length, tokenizer = sys.argv[1:5]
rows = [r for r in json.load(gzip.open(logs))["rows"] if "scores" in r and r["gold_units"]]
hays = json.load(gzip.open(suite))[length]
where = {q["id"]: (h, q) for h in hays for q in h["questions"]}
tok = AutoTokenizer.from_pretrained(tokenizer)
emb = SentenceTransformerEmbedder(batch_size=64)
idx = {}
data = []
t0 = time.time()
for r in rows:
    if r["id"] not in where:
        continue
    h, q = where[r["id"]]
    if id(h) not in idx:
        ix = UnitTextIndex(emb, tok, 128, 128)
        ix.write(0, h["ids"])
        idx[id(h)] = ix
    ix = idx[id(h)]
    n = len(r["scores"]["attention"])
    text = ix.scores(q["prompt"].strip(), n)
    # best window per unit, and whether it crosses the unit's borders
    nw = ix.windows_for(n)
    qv = np.asarray(emb.embed([q["prompt"].strip()]), dtype=np.float32)[0]
    cos = torch.from_numpy(ix._vectors[:nw].astype(np.float32) @ qv)
    first, last = ix.unit_windows(n)
    prev = torch.zeros(n, dtype=torch.bool)
    nxt = torch.zeros(n, dtype=torch.bool)
    for u in range(n):
        ws = cos[int(first[u]) : int(last[u]) + 1]
        w = int(first[u]) + int(ws.argmax())
        a = w * ix.stride
        b = a + ix.window  # relative to n_init
        prev[u] = a < u * 128
        nxt[u] = b > (u + 1) * 128
    data.append((r, torch.tensor(r["scores"]["attention"]), text, prev, nxt))
print("rescored", len(data), f"{time.time() - t0:.0f}s", file=sys.stderr)


def choose_dir(score, k, prev, nxt, first=()):
    order = torch.argsort(score, descending=True).tolist()
    n = score.numel()
    picked, seen = [], set()

    def take(u):
        if 0 <= u < n and u not in seen and len(picked) < k:
            seen.add(u)
            picked.append(u)

    for u in first:
        take(u)
    for u in order:
        if len(picked) >= k:
            break
        take(u)
        if prev[u]:
            take(u - 1)
        if nxt[u]:
            take(u + 1)
    return picked


def ev_dir(a, t, k, prev, nxt, share=0.75):
    ranked = select.hybrid(a, t)
    n_e = max(1, min(k, round(k * share)))
    e = choose_dir(ranked, n_e, prev, nxt)
    return select.choose(a, k, 1, first=e)


def ev(a, t, k, share=0.75):
    return select.evidence_then_attention(select.hybrid(a, t), a, k, 1, share=share)


for k in (16, 8):
    rules = {
        "ev .75 +-1": lambda a, t, p, x, k=k: ev(a, t, k),
        "ev .75 dir": lambda a, t, p, x, k=k: ev_dir(a, t, k, p, x),
        "ev .5 dir": lambda a, t, p, x, k=k: ev_dir(a, t, k, p, x, 0.5),
        "ev .625 dir": lambda a, t, p, x, k=k: ev_dir(a, t, k, p, x, 0.625),
    }
    got = collections.defaultdict(lambda: [0, 0.0, 0, 0.0])
    for r, a, t, p, x in data:
        gold = set(r["gold_units"])
        oracle = set(select.choose(a, k, 1, first=sorted(gold)).tolist())
        for name, rule in rules.items():
            read = set(torch.as_tensor(rule(a, t, p, x)).tolist())
            g = got[(r["family"], name)]
            g[0] += gold <= read
            g[1] += len(read & oracle) / k
            g[2] += 1
            g[3] += len(gold & read) / len(gold)
    fams = sorted({f for f, _ in got})
    print(f"topk {k}: all gold / unit recall / oracle share")
    print("rule".ljust(12), " ".join(f.ljust(16) for f in fams))
    for name in rules:
        print(
            name.ljust(12),
            " ".join(
                f"{got[(f, name)][0] / got[(f, name)][2]:.2f}/{got[(f, name)][3] / got[(f, name)][2]:.2f}/{got[(f, name)][1] / got[(f, name)][2]:.2f}".ljust(
                    16
                )
                for f in fams
            ),
        )
