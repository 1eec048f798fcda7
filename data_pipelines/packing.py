"""Phase 2 of `tokenize`: shuffled documents -> packed samples -> shards of exactly K samples.

Each split is one token stream: its documents in shuffled order, each followed by EOS. Sample i
is stream[i*(T+1) : (i+1)*(T+1)] and shard s holds samples s*K .. s*K+K-1, so every shard is a
pure function of the plan and can be built (or rebuilt after a crash) on its own. The tail that
does not fill a whole sample is dropped and counted in the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import webdataset as wds

from data_pipelines.chunks import load_tokens
from titans_train.data.order import derive_key, permutation
from titans_train.data.shard_format import crc_record, encode_sample, sha256_of
from titans_train.fsutil import write_atomically

_DOC_SHUFFLE = 0xD0C5


def split_documents(n_docs: int, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Seeded shuffle of all documents; the first round(n * val_fraction) form the val split."""
    order = permutation(derive_key(seed, _DOC_SHUFFLE), n_docs)
    n_val = round(n_docs * val_fraction)
    return {"train": order[n_val:], "val": order[:n_val]}


def document_ends(lengths: np.ndarray) -> np.ndarray:
    """Stream offset just past each document's EOS."""
    return np.cumsum(np.asarray(lengths, dtype=np.int64) + 1)


def pack_tokens(
    ends: np.ndarray,
    start: int,
    stop: int,
    fetch: Callable[[int, int, int], np.ndarray],
    eos_id: int,
    dtype: str,
) -> tuple[np.ndarray, np.ndarray]:
    """stream[start:stop] and the stream offsets in it where a document begins.

    fetch(j, lo, hi) returns tokens lo..hi-1 of the j-th document of the stream.
    """
    out = np.empty(stop - start, dtype=dtype)
    begins = []
    j = int(np.searchsorted(ends, start, side="right"))
    pos = start
    while pos < stop:
        begin, end = (int(ends[j - 1]) if j else 0), int(ends[j])
        if begin >= start:
            begins.append(begin)
        hi = min(end, stop)
        body_hi = min(hi, end - 1)  # the EOS sits at end - 1
        if body_hi > pos:
            out[pos - start : body_hi - start] = fetch(j, pos - begin, body_hi - begin)
        if hi == end:
            out[end - 1 - start] = eos_id
        pos, j = hi, j + 1
    return out, np.asarray(begins, dtype=np.int64)


@dataclass(frozen=True)
class ShardTask:
    workdir: str
    outdir: str
    split: str
    index: int
    samples: int  # in this shard
    samples_per_shard: int
    sample_tokens: int
    eos_id: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@lru_cache(maxsize=4)
def _plan(workdir: str, split: str) -> dict[str, np.ndarray]:
    names = ("doc_chunk", "doc_offset", "lengths", f"order-{split}", f"ends-{split}")
    return {
        n.split("-")[0]: np.load(os.path.join(workdir, n + ".npy"), mmap_mode="r") for n in names
    }


@lru_cache(maxsize=64)
def _chunk_tokens(workdir: str, index: int) -> np.ndarray:
    return load_tokens(workdir, index)


def build_shard(task: ShardTask) -> dict:
    """Write one shard (unless an earlier run finished it) and describe it for the manifest."""
    path = os.path.join(task.outdir, task.name)
    if not os.path.exists(path):
        plan = _plan(task.workdir, task.split)

        def fetch(j: int, lo: int, hi: int) -> np.ndarray:
            doc = int(plan["order"][j])
            chunk, offset = int(plan["doc_chunk"][doc]), int(plan["doc_offset"][doc])
            return _chunk_tokens(task.workdir, chunk)[offset + lo : offset + hi]

        t1 = task.sample_tokens
        start = task.index * task.samples_per_shard * t1
        flat, begins = pack_tokens(
            plan["ends"], start, start + task.samples * t1, fetch, task.eos_id, task.dtype
        )
        rows = flat.reshape(task.samples, t1)
        sample_of, offset_in = np.divmod(begins - start, t1)
        cuts = np.searchsorted(sample_of, np.arange(task.samples + 1))
        prefix = f"{task.split}-{task.index:06d}"

        samples = [
            encode_sample(f"{prefix}-{i:06d}", rows[i], offset_in[cuts[i] : cuts[i + 1]])
            for i in range(task.samples)
        ]

        def write(f) -> None:
            with wds.TarWriter(f, encoder=False, mtime=0, user="titans", group="titans") as w:
                w.write(crc_record(samples))  # first: the reader checks each sample as it comes
                for sample in samples:
                    w.write(sample)

        write_atomically(path, write)
    return {
        "name": task.name,
        "samples": task.samples,
        "bytes": os.path.getsize(path),
        "sha256": sha256_of(path),
    }


def clear_caches() -> None:
    """Forget memory maps of an earlier job run in this process (its files may be gone)."""
    _plan.cache_clear()
    _chunk_tokens.cache_clear()
