"""Corpus rows per global batch in the study's data order, from the order alone (no training).

    python benchmarks/study_mix.py [--data runs/study_v2/data] [--steps 1200] [--seeds 0 1 2]

``--data`` holds the study's ``corpus`` and ``recall`` shards (benchmarks/study.py builds them
under ``<out>/data``); without it, the shard sizes of the v2 study's data (docs/results.md:
``--steps 1200 --answer-loss``). For each (mix, interleave) the loader's GlobalOrder maps the
first ``steps`` global batches to sources; a row per configuration and seed gives the corpus
rows per batch (min, max, mean) and the steps without any. docs/data.md ("Mixing") quotes the
table. ``--out F.json`` also writes the rows; ``--smoke``: 50 steps, seed 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from titans_train.data.order import GlobalOrder

ARMS = (("shuffled", 8), ("shuffled", 16), ("stratified", 8), ("stratified", 16))
# The v2 study's train shards: 124 of the embedded corpus (4 MB at T=128), 36 of recall examples.
V2_SIZES = [[256] * 123 + [169], [256] * 35 + [160]]


def shard_sizes(manifest_dir: Path) -> list[int]:
    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    return [s["samples"] for s in manifest["splits"]["train"]["shards"]]


def corpus_rows(
    sizes: list[list[int]], weights: list[float], seed: int, mix: str, interleave: int, steps: int
) -> np.ndarray:
    """Rows of source 0 in each of the first ``steps`` global batches of 16."""
    order = GlobalOrder(sizes, weights, seed, interleave, mix)
    epoch, slot, _ = order.lookup(np.arange(steps * 16))
    source = np.empty_like(slot)
    for e in np.unique(epoch).tolist():
        here = epoch == e
        source[here] = order.epoch_slots(e)[0][slot[here]]
    return (source.reshape(steps, 16) == 0).sum(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="the study's <out>/data (default: v2's sizes)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--recall-share", type=float, default=0.9)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    ap.add_argument("--smoke", action="store_true", help="50 steps, seed 0")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds = 50, [0]
    sizes = V2_SIZES
    if args.data:
        sizes = [shard_sizes(args.data / "corpus"), shard_sizes(args.data / "recall")]
    weights = [1 - args.recall_share, args.recall_share]
    print(f"shards: corpus {len(sizes[0])}, recall {len(sizes[1])}; {args.steps} steps of 16")
    print("| mix | interleave | seed | min | max | mean | steps with none |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for mix, interleave in ARMS:
        for seed in args.seeds:
            n = corpus_rows(sizes, weights, seed, mix, interleave, args.steps)
            row = dict(mix=mix, interleave=interleave, seed=seed, min=int(n.min()))
            row.update(max=int(n.max()), mean=float(n.mean()), steps_without=int((n == 0).sum()))
            rows.append(row)
            print(
                f"| {mix} | {interleave} | {seed} | {row['min']} | {row['max']} | "
                f"{row['mean']:.2f} | {row['steps_without']} |"
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
