"""Cost of document masking (issue 13): the same work with and without ``doc_starts``, side by
side in one process, as JSON.

    python benchmarks/bench_documents.py [--rounds 5] [--seq 1024] [--out FILE]
    python benchmarks/bench_documents.py --smoke        # tiny sizes, seconds

Arms, forward + backward, alternating every round so that machine load hits both sides alike:
  memory-plain / memory-docs   NeuralMemory over P || x, one document per row / the same rows
                               packed with documents (``doc_starts``, P written at each start)
  mac / mag / transformer -plain / -docs   TitansLM (dim 256, depth 2, heads 4, segment 256,
                               window 256, chunk 16) without / with ``doc_starts``
Documents have exponential lengths (``--mean-doc``, at least one token). The report gives the
median seconds per arm, the docs/plain ratio per kind, and the memory stream's padding. One
thread by default: its CPU time is the steady figure on a shared machine (wall time is there too).
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

from titans_train.models import ModelConfig, TitansLM
from titans_train.models.doc_layout import stream_layout
from titans_train.models.memory import NeuralMemory

FULL = dict(batch=2, seq=1024, dim=256, heads=4, chunk=16, persistent=4, segment=256)
SMOKE = dict(batch=2, seq=64, dim=32, heads=2, chunk=8, persistent=2, segment=16)
KINDS = ("memory", "mac", "mag", "transformer")


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


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time of a
    one-thread run is the steadier measure, since being descheduled does not count."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def run(args: argparse.Namespace) -> dict:
    size = SMOKE if args.smoke else dict(FULL, seq=args.seq)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, T, D = size["batch"], size["seq"], size["dim"]
    mem = NeuralMemory(D, size["heads"], chunk_size=size["chunk"])
    x = torch.randn(B, T, D)
    prefix = torch.randn(1, size["persistent"], D)
    starts = doc_starts(B, T, args.mean_doc)

    def memory_arm(docs: bool):
        if docs:
            return lambda: mem(x, doc_starts=starts, prefix=prefix)[0].square().mean().backward()
        full = torch.cat([prefix.expand(B, -1, -1), x], 1)
        return lambda: mem(full)[0].square().mean().backward()

    def model_arm(variant: str, docs: bool):
        model = TitansLM(
            ModelConfig(
                variant=variant, vocab_size=256, dim=D, depth=2, heads=size["heads"],
                window=size["segment"], segment_len=size["segment"], chunk_size=size["chunk"],
                num_persistent=size["persistent"],
            )
        )  # fmt: skip
        tokens = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(1))
        marks = starts if docs else None
        return lambda: model(tokens[:, :-1], tokens[:, 1:], doc_starts=marks).loss.backward()

    arms = {}
    for kind in args.kinds:
        for docs in (False, True):
            name = f"{kind}-{'docs' if docs else 'plain'}"
            arms[name] = memory_arm(docs) if kind == "memory" else model_arm(kind, docs)
    for fn in arms.values():  # warm-up
        fn()
    times = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    wall = {name: statistics.median(w for w, _ in v) for name, v in times.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in times.items()}
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
        "wall_seconds_median": wall,
        "cpu_seconds_median": cpu,
        "tokens_per_cpu_second": {name: B * T / c for name, c in cpu.items()},
        "docs_over_plain_cpu": {k: cpu[f"{k}-docs"] / cpu[f"{k}-plain"] for k in args.kinds},
        "docs_over_plain_wall": {k: wall[f"{k}-docs"] / wall[f"{k}-plain"] for k in args.kinds},
        "rounds": args.rounds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq", type=int, default=FULL["seq"])
    p.add_argument("--mean-doc", type=float, default=256.0, help="mean document length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {KINDS}")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(args.kinds) - set(KINDS):
        p.error(f"--kinds: unknown {sorted(unknown)}; choose from {KINDS}")
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
