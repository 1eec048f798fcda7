"""Cost of document masking in attention: DocCausal vs Causal on the SDPA path, side by side.

    python benchmarks/bench_attention_docs.py [--out FILE]      # T=1024, B=2, 4 heads, d 32, W 128
    python benchmarks/bench_attention_docs.py --smoke --out FILE  # tiny, one repeat (CI)

Forward + backward of ``attend(..., backend="sdpa")`` with one sliding-window group, timed as
the median of repeats in this process, arms interleaved (set OMP_NUM_THREADS yourself). Arms:
  causal       Causal(0, 0, window=W): the block-local path with its analytic key ranges
  doc_one      DocCausal with one document per row (the same visibility as causal)
  doc_packed   DocCausal with documents of 50..400 tokens, different boundaries per row
  doc_fresh    doc_packed with a new rule object every call (nothing cached: a first layer)
  causal_full, doc_one_full, doc_packed_full   the same without a window (full attention:
               Causal takes SDPA's is_causal fast path, DocCausal the block-local path)
The rules are built once per arm and reused across repeats, as a model reuses one per batch
across its layers (the block-local path caches its per-block key spans and masks on the rule).
Writes a JSON list of rows with seconds and the ratio to ``causal`` (``causal_full`` for the
full-attention arms).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from titans_train.models.attention import Causal, DocCausal, KeyGroup, attend


def doc_layout(batch: int, n: int, lengths: list[int] | None, seed: int = 0):
    """Per-row document ids and in-document positions; lengths=None: one document per row."""
    gen = torch.Generator().manual_seed(seed)
    doc = torch.empty(batch, n, dtype=torch.int64)
    pos = torch.empty(batch, n, dtype=torch.int64)
    for b in range(batch):
        t, d = 0, 0
        while t < n:
            if lengths is None:
                size = n
            else:
                size = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
            size = min(size, n - t)
            doc[b, t : t + size], pos[b, t : t + size] = d, torch.arange(size)
            t, d = t + size, d + 1
    return doc, pos


def stepper(make_rule, batch: int, heads: int, n: int, d: int):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, n, d, generator=gen, requires_grad=True) for _ in "qkv")

    def step():
        out = attend(q, [KeyGroup(k, v, make_rule())], backend="sdpa")
        out.sum().backward()

    return step


def interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds per arm, the arms taking turns so that load from other processes falls
    on all of them alike."""
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: stdout only)")
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    batch, heads, n, d, window = (2, 2, 64, 8, 16) if args.smoke else (2, 4, 1024, 32, 128)
    repeats = 1 if args.smoke else args.repeats
    lengths = [5, 11, 30] if args.smoke else [50, 100, 200, 400]
    doc1, pos1 = doc_layout(batch, n, None)
    docp, posp = doc_layout(batch, n, lengths)
    causal = Causal(0, 0, window=window)
    one = DocCausal(doc1, pos1, doc1, pos1, window=window)
    packed = DocCausal(docp, posp, docp, posp, window=window)
    full, one_full = Causal(0, 0), DocCausal(doc1, pos1, doc1, pos1)
    packed_full = DocCausal(docp, posp, docp, posp)
    arms = {
        "causal": lambda: causal,
        "doc_one": lambda: one,
        "doc_packed": lambda: packed,
        "doc_fresh": lambda: DocCausal(docp, posp, docp, posp, window=window),
        "causal_full": lambda: full,
        "doc_one_full": lambda: one_full,
        "doc_packed_full": lambda: packed_full,
    }
    steps = {name: stepper(make, batch, heads, n, d) for name, make in arms.items()}
    rows = [dict(arm=name, seconds=sec) for name, sec in interleaved(steps, repeats).items()]
    base = {row["arm"]: row["seconds"] for row in rows}
    for row in rows:
        ref = "causal_full" if row["arm"].endswith("_full") else "causal"
        row.update(ratio=row["seconds"] / base[ref], baseline=ref, T=n, B=batch, heads=heads, d=d,
                   window=window, threads=torch.get_num_threads())  # fmt: skip
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
