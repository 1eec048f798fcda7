"""StreamingLoader: this rank's micro-batches of every global batch, exactly resumable."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from titans_train.data.errors import DataError
from titans_train.data.manifest import ShardManifest, is_url
from titans_train.data.order import GlobalOrder, rank_positions, shard_rows
from titans_train.data.position import LoaderPosition
from titans_train.data.shard_format import ShardData, ShardRef, read_shard

ManifestLike = str | os.PathLike | ShardManifest


class MicroBatch(NamedTuple):
    tokens: torch.Tensor  # int64 [micro_batch, T+1]: inputs tokens[:, :-1], targets tokens[:, 1:]
    doc_starts: torch.Tensor | None  # bool [micro_batch, T+1]: True where a document begins
    sample_ids: torch.Tensor  # int64 [micro_batch, 3]: source, shard index, row in the shard
    # bool [micro_batch, T+1]: True where a token carries loss as a target (shard_format.py's
    # loss_mask); None when every token of the micro-batch does (shards without the member).
    loss_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class _Load:
    key: tuple[int, int]  # (epoch, slot)
    ref: ShardRef


class _ShardReads(Dataset):
    """Map-style on purpose: DataLoader then returns loads in plan order for any num_workers."""

    def __getitem__(self, load: _Load) -> tuple[tuple[int, int], ShardData]:
        return load.key, read_shard(load.ref)


class _Plan:
    def __init__(self, loads: Iterator[_Load]):
        self.loads = loads

    def __iter__(self) -> Iterator[_Load]:
        return self.loads


def _no_collate(x):
    return x


def _fingerprint(
    manifests: list[ShardManifest], split: str, weights, seed, interleave, stratified: bool
) -> str:
    parts = [m.fingerprint(split) for m in manifests] + [split, weights, seed, interleave]
    if stratified:  # only then: the states saved before mixes existed keep their fingerprint
        parts.append("stratified")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _check_manifest(m: ShardManifest, split: str, seq_len: int, vocab_size: int) -> None:
    if m.seq_len != seq_len:
        raise DataError(
            f"manifest {m.location}: samples hold seq_len {m.seq_len} (+1) tokens but the model "
            f"expects seq_len {seq_len}; re-tokenize with --seq-len {seq_len}"
        )
    if m.vocab_size > vocab_size:
        raise DataError(
            f"manifest {m.location}: tokenizer vocab_size {m.vocab_size} exceeds the model's "
            f"vocab_size {vocab_size}"
        )
    if not m.shards(split):
        raise DataError(f"manifest {m.location}: no shards in split {split!r}")
    for shard in m.shards(split):
        url = m.url(shard)
        if not is_url(url) and not os.path.exists(url):
            raise DataError(f"shard {shard.name} listed in {m.location} is missing: {url}")


def check_sources(
    sources: Sequence[str], seq_len: int, vocab_size: int, split: str = "train"
) -> None:
    """The checks the loader makes, without reading a shard: run before the slow start-up.

    Local manifests only (a URL is checked when the loader opens it): seq_len and vocabulary
    against the model, and every shard of ``split`` present.
    """
    for src in sources:
        if not is_url(src):
            _check_manifest(ShardManifest.load(src), split, seq_len, vocab_size)


def _open_manifests(
    manifests: ManifestLike | Sequence[ManifestLike], split: str, seq_len: int, vocab_size: int
) -> list[ShardManifest]:
    """The manifests, loaded and checked against the model; one tokenizer for all."""
    if isinstance(manifests, (str, os.PathLike, ShardManifest)):
        manifests = [manifests]
    opened = [m if isinstance(m, ShardManifest) else ShardManifest.load(m) for m in manifests]
    tokenizers = {m.data["tokenizer"].get("sha256") for m in opened}
    if len(tokenizers) > 1:
        raise DataError(f"manifests use different tokenizers: {sorted(map(str, tokenizers))}")
    for m in opened:
        _check_manifest(m, split, seq_len, vocab_size)
    return opened


def _shard_refs(
    m: ShardManifest, split: str, vocab_size: int, verify: bool, check_crc: bool
) -> list[ShardRef]:
    return [
        ShardRef(
            m.url(s),
            s.name,
            s.samples,
            s.sha256,
            m.sample_tokens,
            m.dtype,
            vocab_size,
            verify,
            crc=m.sample_crc,
            check_crc=check_crc,
        )
        for s in m.shards(split)
    ]


class StreamingLoader:
    """Reads packed webdataset shards in the global order of `order.GlobalOrder`.

    Each call of `next_step()` returns this rank's share of one global batch as a list of
    micro-batches (gradient-accumulation steps). The state is `state_dict()`: one global sample
    count, valid for any world size, micro-batch split and `num_workers`.
    """

    def __init__(
        self,
        manifests: ManifestLike | Sequence[ManifestLike],
        *,
        seq_len: int,
        vocab_size: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        split: str = "train",
        num_workers: int = 0,
        interleave: int = 8,
        mix: str = "stratified",
        verify: bool = False,
        check_crc: bool = True,
        max_epochs: int | None = None,
        return_doc_starts: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if global_batch % (world_size * micro_batch):
            raise ValueError(
                f"global_batch {global_batch} is not a multiple of world_size {world_size} x "
                f"micro_batch {micro_batch}"
            )
        self.manifests = _open_manifests(manifests, split, seq_len, vocab_size)
        self.refs = [_shard_refs(m, split, vocab_size, verify, check_crc) for m in self.manifests]
        sizes = [[r.samples for r in refs] for refs in self.refs]
        self.order = GlobalOrder(sizes, weights, seed, interleave, mix)
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.return_doc_starts = num_workers, return_doc_starts
        self.stop = None if max_epochs is None else self.order.epoch_start(max_epochs)
        weights_key = None if weights is None else [float(w) for w in weights]
        fingerprint = _fingerprint(
            self.manifests, split, weights_key, seed, interleave, self.order.stratified
        )
        self.position = LoaderPosition(0, fingerprint, mix=mix, mix_applies=len(sizes) > 1)
        self._it: Iterator | None = None
        self._loaded: dict[tuple[int, int], tuple[ShardData, np.ndarray]] = {}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.position.epoch = self.order.locate(self.position.samples)
        return self.position.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.position.load_state_dict(state, strict=strict)
        self.close()

    def close(self) -> None:
        """Stop the shard readers (they restart from the position on the next step)."""
        self._it = None  # dropping the DataLoader iterator shuts its workers down
        self._loaded.clear()

    # -- iteration ---------------------------------------------------------------------------
    @property
    def steps_remaining(self) -> int | None:
        """Whole global batches left before `max_epochs` ends (None: endless)."""
        if self.stop is None:
            return None
        return max(0, (self.stop - self.position.samples) // self.global_batch)

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        while self.steps_remaining != 0:
            yield self.next_step()

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next optimizer step."""
        if self.steps_remaining == 0:
            raise StopIteration
        per_rank = self.global_batch // self.world_size
        positions = rank_positions(self.position.samples, self.rank, self.world_size, per_rank)
        epoch, slot, row = self.order.lookup(positions)
        t1 = self.seq_len + 1
        tokens = np.empty((per_rank, t1), dtype=np.int64)
        starts = np.zeros((per_rank, t1), dtype=np.uint8)
        rows = np.empty(per_rank, dtype=np.int64)
        loss = np.ones((per_rank, t1), dtype=np.uint8)
        span = int(slot.max()) + 1
        keys, which = np.unique(epoch * span + slot, return_inverse=True)
        by_shard = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[by_shard], np.arange(len(keys) + 1)).tolist()
        for k, key in enumerate(keys.tolist()):  # one gather per shard, not per row
            sel = by_shard[bounds[k] : bounds[k + 1]]
            data, perm = self._shard(divmod(key, span))
            rows[sel] = r = perm[row[sel]]
            tokens[sel] = data.tokens[r]
            if self.return_doc_starts:
                starts[sel] = np.unpackbits(data.start_bits[r], axis=1, count=t1)
            if data.loss_bits is not None:
                loss[sel] = np.unpackbits(data.loss_bits[r], axis=1, count=t1)
        ids = np.empty((per_rank, 3), dtype=np.int64)
        ids[:, 2] = rows
        for e in np.unique(epoch).tolist():
            here = epoch == e
            source, shard = self.order.epoch_slots(e)[:2]
            ids[here, 0], ids[here, 1] = source[slot[here]], shard[slot[here]]
        self._release(int(epoch[-1]), int(slot[-1]) // self.order.interleave)
        self.position.samples += self.global_batch
        b = self.micro_batch
        tokens_t, ids_t, starts_t = (torch.from_numpy(a) for a in (tokens, ids, starts.view(bool)))
        loss_t = torch.from_numpy(loss.view(bool))
        return [
            MicroBatch(
                tokens_t[a : a + b],
                starts_t[a : a + b] if self.return_doc_starts else None,
                ids_t[a : a + b],
                None if loss_t[a : a + b].all() else loss_t[a : a + b],
            )
            for a in range(0, per_rank, b)
        ]

    def _shard(self, key: tuple[int, int]) -> tuple[ShardData, np.ndarray]:
        if self._it is None:
            self._it = self._pipeline()
        while key not in self._loaded:
            try:
                got, data = next(self._it)
            except StopIteration:
                raise DataError(f"internal: shard plan ended before epoch/slot {key}") from None
            source, shard, src_epoch = (int(a[got[1]]) for a in self.order.epoch_slots(got[0])[:3])
            rows = shard_rows(self.seed, source, src_epoch, shard, len(data.keys))
            self._loaded[got] = (data, rows)
        return self._loaded[key]

    def _release(self, epoch: int, stripe: int) -> None:
        for key in [
            k for k in self._loaded if (k[0], k[1] // self.order.interleave) < (epoch, stripe)
        ]:
            del self._loaded[key]

    def _pipeline(self) -> Iterator[tuple[tuple[int, int], ShardData]]:
        first = self.position.samples + self.rank
        loads = _loads(self.order, self.refs, first, self.world_size, self.stop)
        if self.num_workers == 0:
            reads = _ShardReads()
            return (reads[load] for load in loads)
        # Prefetch about one stripe's worth of this rank's shards while the current is consumed.
        per_stripe = math.ceil(self.order.interleave / self.world_size)
        loader = DataLoader(
            _ShardReads(),
            batch_size=None,
            sampler=_Plan(loads),
            num_workers=self.num_workers,
            collate_fn=_no_collate,
            prefetch_factor=max(2, math.ceil(per_stripe / self.num_workers)),
        )
        return iter(loader)

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _loads(order: GlobalOrder, refs: list[list[ShardRef]], first: int, stride: int, stop):
    """The shard reads of a rank's plan. A free function: a generator holding the loader itself
    would make a reference cycle that leaves DataLoader workers to the cycle collector."""
    for epoch, slot in order.shard_plan(first, stride, stop):
        source, shard = order.epoch_slots(epoch)[:2]
        yield _Load((epoch, slot), refs[int(source[slot])][int(shard[slot])])


def validation_loader(
    manifests: ManifestLike | Sequence[ManifestLike], **kwargs
) -> StreamingLoader:
    """One pass over the val split in whole global batches (same count on every rank)."""
    return StreamingLoader(manifests, split="val", max_epochs=1, **kwargs)
