"""`tokenize`: corpus -> packed webdataset shards of exactly K samples + manifest.json.

Two phases with bounded memory (docs/data.md, "Tokenize"):
1. stream documents in file order, tokenize them in chunks with --workers processes, and
   commit each chunk to OUT/.work/;
2. shuffle the documents (seeded permutation of document ids), split train/val, and write each
   shard, a pure function of that plan, to a temporary name renamed when complete.
manifest.json is written last. `--resume` skips committed chunks and shards, so a crashed job
resumed gives byte-identical shards and manifest; --workers never changes the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context

import numpy as np
from tqdm import tqdm

from data_pipelines import chunks, packing
from data_pipelines.sources import ERRORS, DecodeStats, expand_sources, iter_documents
from titans_train import __version__
from titans_train.data.manifest import FORMAT, MANIFEST_NAME, SPLITS, VERSION
from titans_train.data.shard_format import (
    CRC_MEMBER,
    DOC_STARTS_FIELD,
    token_dtype,
    tokens_field,
)
from titans_train.data.tokenizer import TextTokenizer, load_tokenizer
from titans_train.fsutil import write_atomically, write_json_atomically

WORK = ".work"
# TokenizeConfig fields that change where and how the job runs but never what it writes.
RUN_KEYS = (
    "out",
    "workers",
    "chunk_docs",
    "chunk_mb",
    "resume",
    "overwrite",
    "keep_work",
    "progress",
)


@dataclass
class TokenizeConfig:
    sources: list[str]
    out: str
    tokenizer: str = "bytes"
    eos_token: str | None = None
    seq_len: int = 1024
    samples_per_shard: int = 1024
    val_fraction: float = 0.01
    seed: int = 0
    text_field: str = "text"
    encoding: str = "utf-8"
    errors: str = "strict"  # or "replace": undecodable bytes -> U+FFFD, counted in the manifest
    workers: int = 1
    chunk_docs: int = 256
    chunk_mb: float = 1.0
    resume: bool = False
    overwrite: bool = False
    keep_work: bool = False
    progress: bool = True

    def result_config(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RUN_KEYS}


def ordered_map(fn: Callable, items: Iterable, pool: Executor | None, depth: int) -> Iterator:
    """map(fn, items) in order, with at most `depth` items in flight (bounded memory)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _prepare_out(cfg: TokenizeConfig) -> str | None:
    """The work directory, or None when a finished job is already there and --resume was given."""
    manifest, work = os.path.join(cfg.out, MANIFEST_NAME), os.path.join(cfg.out, WORK)
    if cfg.overwrite and os.path.isdir(cfg.out):
        for name in os.listdir(cfg.out):
            path = os.path.join(cfg.out, name)
            if name == WORK:
                shutil.rmtree(path)
            elif name.endswith((".tar", ".tmp")) or name in (MANIFEST_NAME, "tokenizer.json"):
                os.remove(path)
    elif os.path.exists(manifest):
        if cfg.resume:
            return None
        raise FileExistsError(f"{manifest} exists: pass --overwrite to rebuild")
    elif os.path.isdir(work) and not cfg.resume:
        raise FileExistsError(f"{work} holds an interrupted job: pass --resume or --overwrite")
    os.makedirs(work, exist_ok=True)
    return work


def _check_job(work: str, job: dict) -> None:
    """A resumed job must be the same job: same config, chunking and unchanged inputs."""
    path = os.path.join(work, "job.json")
    if not os.path.exists(path):
        write_json_atomically(path, job)
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
    if changed:
        raise ValueError(f"--resume: the interrupted job in {work} differs in {changed}")


def _tokenize_chunks(
    cfg: TokenizeConfig, work: str, files: list[str], dtype: str, pool, stats: DecodeStats
) -> int:
    """Phase 1. Returns the number of chunks; completed ones are skipped without tokenizing."""
    docs = iter_documents(files, cfg.text_field, cfg.encoding, cfg.errors, stats)
    groups = chunks.group_documents(docs, cfg.chunk_docs, int(cfg.chunk_mb * 2**20))
    bar = tqdm(desc="tokenize", unit="doc", disable=not cfg.progress)
    count = 0

    def todo():
        nonlocal count
        for index, texts in enumerate(groups):
            count = index + 1
            if chunks.chunk_done(work, index):
                bar.update(len(texts))
            else:
                yield (work, index, texts, dtype)

    for table in ordered_map(chunks.tokenize_chunk, todo(), pool, 2 * cfg.workers):
        bar.update(len(table))
    bar.close()
    return count


def _save(work: str, name: str, array: np.ndarray) -> None:
    write_atomically(os.path.join(work, name + ".npy"), lambda f: np.save(f, array))


def _plan_shards(cfg: TokenizeConfig, work: str, n_chunks: int, tok: TextTokenizer, dtype: str):
    """Phase 2 plan: document locations, the shuffle/split, and one task per shard."""
    tables = [chunks.load_lengths(work, i) for i in range(n_chunks)]
    table = np.concatenate(tables) if tables else np.zeros((0, 2), np.int64)
    lengths = table[:, 0]
    offsets = [np.concatenate([[0], np.cumsum(t[:, 0])[:-1]]) for t in tables if len(t)]
    _save(work, "lengths", lengths)
    _save(work, "doc_chunk", np.repeat(np.arange(n_chunks), [len(t) for t in tables]))
    _save(work, "doc_offset", np.concatenate(offsets) if offsets else np.zeros(0, np.int64))
    t1, k = cfg.seq_len + 1, cfg.samples_per_shard
    tasks, splits = [], {}
    for split, order in packing.split_documents(len(lengths), cfg.seed, cfg.val_fraction).items():
        ends = packing.document_ends(lengths[order])
        _save(work, f"order-{split}", order)
        _save(work, f"ends-{split}", ends)
        stream = int(ends[-1]) if len(ends) else 0
        n = stream // t1
        splits[split] = {
            "documents": len(order),
            "samples": n,
            "tokens": n * t1,
            "dropped_tokens": stream - n * t1,
        }
        for s in range(-(-n // k)):
            samples = min(k, n - s * k)
            tasks.append(
                packing.ShardTask(work, cfg.out, split, s, samples, k, t1, tok.eos_id, dtype)
            )
    totals = {
        "documents": len(lengths),
        "text_bytes": int(table[:, 1].sum()),
        "tokens": int(lengths.sum()) + len(lengths),
    }
    return tasks, splits, totals


def run(cfg: TokenizeConfig) -> dict:
    """Run the job; returns the manifest (also when an earlier run already finished it).

    A job this call started that fails on its input (an undecodable byte, a bad record, a
    missing file) removes its work directory: resuming would need the same inputs anyway.
    """
    had_out = os.path.isdir(cfg.out)
    fresh = cfg.overwrite or not os.path.isdir(os.path.join(cfg.out, WORK))
    work = _prepare_out(cfg)
    if work is None:
        with open(os.path.join(cfg.out, MANIFEST_NAME), encoding="utf-8") as f:
            return json.load(f)
    try:
        return _run(cfg, work)
    except (ValueError, OSError):
        if fresh and os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
            if not had_out and not os.listdir(cfg.out):
                os.rmdir(cfg.out)
        raise


def _run(cfg: TokenizeConfig, work: str) -> dict:
    tok = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    dtype = token_dtype(tok.vocab_size).name
    files = expand_sources(cfg.sources)
    inputs = [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]
    chunking = {"chunk_docs": cfg.chunk_docs, "chunk_mb": cfg.chunk_mb}
    _check_job(work, {**cfg.result_config(), **chunking, "inputs": inputs})
    packing.clear_caches()  # before forking: maps of an earlier run here may be stale
    pool = None
    if cfg.workers > 1:
        # fork: workers start at once with the parent's imports (spawn re-imports __main__,
        # torch included). Safe: this process never runs the tokenizer's thread pool.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(
            cfg.workers, get_context(method), chunks.init_worker, (cfg.tokenizer, cfg.eos_token)
        )
    else:
        chunks.init_worker(cfg.tokenizer, cfg.eos_token)
    stats = DecodeStats()
    try:
        n_chunks = _tokenize_chunks(cfg, work, files, dtype, pool, stats)
        tasks, splits, totals = _plan_shards(cfg, work, n_chunks, tok, dtype)
        bar = tqdm(total=len(tasks), desc="pack", unit="shard", disable=not cfg.progress)
        infos = []
        for info in ordered_map(packing.build_shard, tasks, pool, 2 * cfg.workers):
            infos.append(info)
            bar.update()
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    totals["replaced_characters"] = stats.replaced  # errors="replace": U+FFFD inserted
    if stats.replaced:
        first = next(iter(stats.files))
        print(
            f"warning: {stats.replaced} undecodable byte sequences replaced with U+FFFD in "
            f"{len(stats.files)} file(s), e.g. {first} ({stats.files[first]})",
            file=sys.stderr,
        )
    manifest = _manifest(cfg, tok, dtype, tasks, infos, splits, totals)
    if tok.path is not None:
        with open(tok.path, "rb") as f:
            data = f.read()
        write_atomically(os.path.join(cfg.out, "tokenizer.json"), lambda f: f.write(data))
    write_json_atomically(os.path.join(cfg.out, MANIFEST_NAME), manifest)  # last: the commit
    if not cfg.keep_work:
        shutil.rmtree(work)
    return manifest


def _manifest(cfg, tok, dtype, tasks, infos, splits, totals) -> dict:
    for split in SPLITS:
        splits[split]["shards"] = [i for t, i in zip(tasks, infos) if t.split == split]
    totals.update(
        samples=sum(s["samples"] for s in splits.values()),
        shards=len(infos),
        bytes=sum(i["bytes"] for i in infos),
    )
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_by": f"titans-train {__version__} data_pipelines.tokenize",
        "tokenizer": tok.identity(),
        "seq_len": cfg.seq_len,
        "sample_tokens": cfg.seq_len + 1,
        "dtype": dtype,
        "samples_per_shard": cfg.samples_per_shard,
        "fields": {
            "tokens": tokens_field(dtype),
            "doc_starts": DOC_STARTS_FIELD,
            "crc32": CRC_MEMBER,
        },
        "splits": splits,
        "totals": totals,
        "config": cfg.result_config(),
    }


def add_packing_arguments(
    p: argparse.ArgumentParser, seq_len: int, samples: int, val: float
) -> None:
    """Options shared by `tokenize` and `demo`, with their own defaults."""
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (built in) or a tokenizer.json")
    p.add_argument("--seq-len", type=int, default=seq_len, help="T: each sample holds T+1 tokens")
    p.add_argument("--samples-per-shard", type=int, default=samples, help="K samples per shard")
    p.add_argument("--val-fraction", type=float, default=val, help="fraction of documents for val")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    p.add_argument("--workers", type=int, default=1, help="tokenizer/packer processes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help="text files, dirs, globs, .jsonl[.gz|.zst], .parquet")
    add_packing_arguments(p, seq_len=1024, samples=1024, val=0.01)
    p.add_argument("--eos-token", help="EOS token of a tokenizer.json (default: a common name)")
    p.add_argument("--text-field", default="text", help="text field of jsonl / parquet records")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt and .jsonl inputs")
    p.add_argument(
        "--errors",
        choices=ERRORS,
        default="strict",
        help="undecodable bytes: stop naming file and line (strict), or U+FFFD, counted in the "
        "manifest (replace)",
    )
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per work chunk")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="max text MB per work chunk")
    p.add_argument("--resume", action="store_true", help="finish an interrupted job in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier job in --out first")
    p.add_argument("--keep-work", action="store_true", help="keep OUT/.work (tokenized chunks)")


def run_args(args: argparse.Namespace) -> int:
    fields = TokenizeConfig.__dataclass_fields__
    cfg = TokenizeConfig(**{k: v for k, v in vars(args).items() if k in fields})
    t = run(cfg)["totals"]
    print(f"{t['documents']} documents -> {t['samples']} samples, {t['shards']} shards: {cfg.out}")
    return 0


if __name__ == "__main__":
    from data_pipelines.cli import main

    raise SystemExit(main(["tokenize", *sys.argv[1:]]))
