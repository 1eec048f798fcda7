"""`verify`: re-hash every shard against its manifest and check every sample.

Checks per shard: it exists, its size and sha256 match the manifest, it holds exactly the
listed samples of T+1 tokens, every token id is below the vocabulary size, and doc starts lie
inside their sample. Exits nonzero with the list of problems if anything is off.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from titans_train.data.errors import DataError
from titans_train.data.manifest import ShardManifest
from titans_train.data.shard_format import ShardRef, read_shard


def verify(path: str, vocab_size: int | None = None, progress: bool = True) -> list[str]:
    """Problems found in the manifest at `path` and its shards (empty list: all good)."""
    try:
        manifest = ShardManifest.load(path)
    except DataError as exn:
        return [str(exn)]
    vocab = vocab_size or manifest.vocab_size
    problems = []
    shards = [(split, s) for split in manifest.data["splits"] for s in manifest.shards(split)]
    for _split, shard in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        url = manifest.url(shard)
        if os.path.exists(url) and os.path.getsize(url) != shard.bytes:
            size = os.path.getsize(url)
            problems.append(f"shard {shard.name}: {size} bytes, manifest says {shard.bytes}")
            continue
        ref = ShardRef(
            url,
            shard.name,
            shard.samples,
            shard.sha256,
            manifest.sample_tokens,
            manifest.dtype,
            vocab,
            verify=True,
            crc=manifest.sample_crc,
        )
        try:
            data = read_shard(ref)
        except DataError as exn:
            problems.append(str(exn))
            continue
        for row, key in enumerate(data.keys):
            starts = data.doc_starts(row)
            if (starts >= manifest.sample_tokens).any() or (np.diff(starts) <= 0).any():
                problems.append(f"shard {shard.name} sample {key}: doc_starts {starts.tolist()}")
                break
    return problems


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="manifest.json, or the directory holding it, or a URL")
    p.add_argument("--vocab-size", type=int, help="check ids against this (default: manifest's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_args(args: argparse.Namespace) -> int:
    problems = verify(args.manifest, args.vocab_size, args.progress)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.manifest}")
        return 1
    print(f"OK {args.manifest}")
    return 0


if __name__ == "__main__":
    from data_pipelines.cli import main

    raise SystemExit(main(["verify", *sys.argv[1:]]))
