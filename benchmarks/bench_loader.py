"""Loader throughput: StreamingLoader against a plain webdataset read of the same tars.

Both read one epoch of demo shards (stdlib sources, byte tokenizer, T=1024 uint16) and hand
out int64 [batch, T+1] tensors, with 0 and 2 DataLoader workers. The plain read is the usual
webdataset pipeline (decode, batch, WebLoader); it has no global order, no resume and no
checks. Our loader also runs with its per-sample CRC32 check off, so the check's cost is a
ratio measured in the same run (``crc_check_cost``). Rounds interleave the configurations and
the best of each is kept. Prints JSON.

    PYTHONPATH=. python benchmarks/bench_loader.py [--max-mb 16] [--batch 16] [--out FILE]
    PYTHONPATH=. python benchmarks/bench_loader.py --smoke --out FILE   # seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds

from data_pipelines.demo import build_demo
from titans_train.data import ShardManifest, StreamingLoader

TINY_MODEL_TOKENS_PER_S = 20_000  # assumed consumption of the tiny CPU model (not measured)


def _decode(sample: dict) -> np.ndarray:
    return np.frombuffer(sample["tokens.u16"], dtype="<u2")


def _collate(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def plain(manifest: ShardManifest, batch: int, workers: int) -> int:
    urls = [manifest.url(s) for s in manifest.shards("train")]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, seed=0)
        .map(_decode)
        .batched(batch, collation_fn=_collate, partial=False)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(b) for b in loader)


def ours(
    manifest: ShardManifest, batch: int, workers: int, doc_starts: bool, crc: bool = True
) -> int:
    loader = StreamingLoader(
        manifest,
        seq_len=manifest.seq_len,
        vocab_size=manifest.vocab_size,
        global_batch=batch,
        micro_batch=batch,
        num_workers=workers,
        max_epochs=1,
        return_doc_starts=doc_starts,
        check_crc=crc,
    )
    with loader:
        return sum(len(mb.tokens) for step in loader for mb in step)


def timed(fn, *args) -> dict:
    start = time.perf_counter()
    samples = fn(*args)
    return {"samples": samples, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mb", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="0.25 MB, T=256, batch 4, one round (CI)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    seq_len, per_shard = 1024, 128
    if args.smoke:  # several shards, so the 2-worker runs split them as the real ones do
        args.max_mb, args.batch, args.repeat, seq_len, per_shard = 0.25, 4, 1, 256, 16
    with tempfile.TemporaryDirectory() as out:
        build_demo(out, seq_len=seq_len, samples_per_shard=per_shard, max_mb=args.max_mb,
                   progress=False)  # fmt: skip
        manifest = ShardManifest.load(out)
        runs = {}
        for w in (0, 2):
            runs[f"plain webdataset, {w} workers"] = (plain, manifest, args.batch, w)
            runs[f"StreamingLoader, {w} workers"] = (ours, manifest, args.batch, w, True)
            runs[f"StreamingLoader, {w} workers, no doc_starts"] = (
                ours,
                manifest,
                args.batch,
                w,
                False,
            )
            runs[f"StreamingLoader, {w} workers, no CRC check"] = (
                ours,
                manifest,
                args.batch,
                w,
                True,
                False,
            )
        plain(manifest, args.batch, 0)  # warm the page cache
        results: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, (fn, *fn_args) in runs.items():
                r = timed(fn, *fn_args)
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
    t1 = manifest.sample_tokens
    for name, r in results.items():
        r["samples/s"] = r["samples"] / r["seconds"]
        r["tokens/s"] = r["samples/s"] * t1
        r["x_tiny_model"] = r["tokens/s"] / TINY_MODEL_TOKENS_PER_S
        base = results[
            name.split(",")[0].replace("StreamingLoader", "plain webdataset")
            + ","
            + name.split(",")[1]
        ]
        r["ratio_to_plain"] = r["samples/s"] / base["samples/s"]
    # seconds with the CRC check / seconds without it (1.02 = the check costs 2 %)
    crc_cost = {
        f"{w} workers": results[f"StreamingLoader, {w} workers"]["seconds"]
        / results[f"StreamingLoader, {w} workers, no CRC check"]["seconds"]
        for w in (0, 2)
    }
    report = {
        "benchmark": "loader",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "seq_len": manifest.seq_len,
        "tiny_model_tokens_per_s_assumed": TINY_MODEL_TOKENS_PER_S,
        "crc_check_cost": crc_cost,
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    empty = [name for name, r in results.items() if not r["samples"]]
    if empty:
        sys.exit(f"bench_loader: no samples read by {', '.join(empty)}")


if __name__ == "__main__":
    main()
