"""Cost of document masking (issue 13): the same work with and without ``doc_starts``, side by
side in one process, as JSON.

    python benchmarks/bench_documents.py [--rounds 5] [--seq 1024] [--out FILE]
    python benchmarks/bench_documents.py --smoke        # tiny sizes, seconds

Arms (forward + backward, alternating every round so that machine load hits both alike):
  memory-plain   NeuralMemory over P || x, one document per row (what the blocks ran before)
  memory-docs    the same rows packed with documents (``doc_starts``, P written at each start)
Documents have lengths drawn from an exponential distribution (``--mean-doc``); the report
gives the median seconds per arm, the overhead ratio, and the stream's padding (slots per token).
The model-level arms (MAC, MAG, Transformer++) join when the blocks take documents.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from titans_train.models.doc_layout import stream_layout
from titans_train.models.memory import NeuralMemory

FULL = dict(batch=2, seq=1024, dim=256, heads=4, chunk=16, persistent=4)
SMOKE = dict(batch=2, seq=64, dim=32, heads=2, chunk=8, persistent=2)


def doc_starts(batch: int, seq: int, mean: float, seed: int = 0) -> torch.Tensor:
    """Document starts with exponential lengths (at least one token), as a packer writes them."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        t = 0
        while t < seq:
            starts[b, t] = True
            t += 1 + int(torch.empty(1).exponential_(1 / mean, generator=g))
    return starts


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    size = SMOKE if args.smoke else dict(FULL, seq=args.seq)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, T, D = size["batch"], size["seq"], size["dim"]
    mem = NeuralMemory(D, size["heads"], chunk_size=size["chunk"])
    x = torch.randn(B, T, D)
    prefix = torch.randn(1, size["persistent"], D)
    starts = doc_starts(B, T, args.mean_doc)

    def plain():
        mem(torch.cat([prefix.expand(B, -1, -1), x], 1))[0].square().mean().backward()

    def docs():
        mem(x, doc_starts=starts, prefix=prefix)[0].square().mean().backward()

    arms = {"memory-plain": plain, "memory-docs": docs}
    for fn in arms.values():  # warm-up
        fn()
    times = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(v) for name, v in times.items()}
    first = starts.clone()
    first[:, 0] = True
    layout = stream_layout(
        first, torch.zeros(B, dtype=torch.long), size["persistent"], size["chunk"]
    )
    return {
        "benchmark": "bench_documents",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "size": size,
        "documents_per_row": starts.sum(1).tolist(),
        "stream_slots_per_token": layout.doc.shape[1] / T,
        "seconds_median": median,
        "memory_docs_over_plain": median["memory-docs"] / median["memory-plain"],
        "rounds": args.rounds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq", type=int, default=FULL["seq"])
    p.add_argument("--mean-doc", type=float, default=256.0, help="mean document length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.mean_doc = 1, 16.0
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
