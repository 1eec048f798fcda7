"""Corpus rows per global batch in the study's data order, from the order alone (no training).

    python benchmarks/study_mix.py --data runs/study/data [--steps 1200] [--seeds 0 1 2]

``--data`` holds the study's ``corpus`` and ``recall`` shards (benchmarks/study.py builds them
under ``<out>/data``). For each (mix, interleave) the loader's GlobalOrder maps the first
``steps`` global batches to sources; a row per configuration and seed gives the corpus rows per
batch (min, max, mean) and the steps without any. docs/data.md ("Mixing") quotes the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from titans_train.data.order import GlobalOrder

ARMS = (("shuffled", 8), ("stratified", 8), ("stratified", 16))


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
    ap.add_argument("--data", type=Path, required=True, help="the study's <out>/data")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--recall-share", type=float, default=0.9)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    args = ap.parse_args(argv)
    sizes = [shard_sizes(args.data / "corpus"), shard_sizes(args.data / "recall")]
    weights = [1 - args.recall_share, args.recall_share]
    print(f"shards: corpus {len(sizes[0])}, recall {len(sizes[1])}; {args.steps} steps of 16")
    print("| mix | interleave | seed | min | max | mean | steps with none |")
    print("|---|---|---|---|---|---|---|")
    for mix, interleave in ARMS:
        for seed in args.seeds:
            rows = corpus_rows(sizes, weights, seed, mix, interleave, args.steps)
            print(
                f"| {mix} | {interleave} | {seed} | {rows.min()} | {rows.max()} | "
                f"{rows.mean():.2f} | {(rows == 0).sum()} |"
            )


if __name__ == "__main__":
    main()
