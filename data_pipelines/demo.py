"""`demo`: shards from an embedded corpus, the Python standard library's own source files.

Real text on every machine with no download. The files are taken in sorted order up to
--max-mb, so the same Python gives the same shards. Built with the byte tokenizer by default;
an existing demo with the same settings is reused. This is what `make train` calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig

from data_pipelines import tokenize
from titans_train.data.manifest import MANIFEST_NAME

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib"}


def stdlib_files(max_mb: float) -> list[str]:
    """Sorted stdlib .py files (tests and installed packages excluded), up to max_mb in total."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found += [os.path.join(here, n) for n in names if n.endswith(".py")]
    found.sort(key=lambda p: os.path.relpath(p, root))
    chosen, size = [], 0
    for path in found:
        if size >= max_mb * 2**20:
            break
        chosen.append(path)
        size += os.path.getsize(path)
    return chosen


def build_demo(
    out: str,
    seq_len: int = 256,
    samples_per_shard: int = 256,
    tokenizer: str = "bytes",
    max_mb: float = 4.0,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Build (or reuse) demo shards in `out`; returns the manifest."""
    cfg = tokenize.TokenizeConfig(
        sources=stdlib_files(max_mb),
        out=out,
        tokenizer=tokenizer,
        seq_len=seq_len,
        samples_per_shard=samples_per_shard,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers,
        progress=progress,
        resume=True,
    )
    manifest = tokenize.run(cfg)
    if manifest["config"] != cfg.result_config():  # an older demo with other settings
        cfg.resume, cfg.overwrite = False, True
        manifest = tokenize.run(cfg)
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    tokenize.add_packing_arguments(p, seq_len=256, samples=256, val=0.05)
    p.add_argument("--max-mb", type=float, default=4.0, help="how much stdlib source to use")


def run_args(args: argparse.Namespace) -> int:
    manifest = build_demo(
        args.out,
        args.seq_len,
        args.samples_per_shard,
        args.tokenizer,
        args.max_mb,
        args.val_fraction,
        args.seed,
        args.workers,
        args.progress,
    )
    t = manifest["totals"]
    path = os.path.join(args.out, MANIFEST_NAME)
    print(f"demo: {t['samples']} samples in {t['shards']} shards: {path}")
    return 0


if __name__ == "__main__":
    from data_pipelines.cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
