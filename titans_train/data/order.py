"""The global sample order: a pure function of (seed, epoch, position). See docs/data.md.

An epoch is a list of shard *slots*. With one source it is every shard once; with several,
each source fills a fixed number of slots per epoch (its weight) by walking its own endless
sequence of shard permutations. The slots are ordered by (seed, epoch) and cut into stripes of
`interleave` slots: mix "stratified" spreads each source's slots evenly over the epoch (any run of
m slots holds about m times its slot share of each source), mix "shuffled" (the order before
2026-12-02) permutes them uniformly, so a small source's slots clump. With one source both are
the same uniform permutation. Inside a stripe the samples are read round-robin: row 0 of every slot,
then row 1, and so on, where row t of a shard is its t-th sample under a permutation seeded by
(seed, source, source epoch, shard). Global position P counts samples from the very start,
epoch after epoch, so a position is the whole loader state.

A step takes positions [P, P + G); rank r of W takes P + r, P + r + W, ... Rank r thus follows
the arithmetic progression P0 + r + W*k forever, and reads only the slots congruent to its rank
when W divides `interleave`. Nothing here depends on the number of DataLoader workers.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
# Stream ids keep the seeded permutations of different purposes apart.
_SHARDS, _SLOTS, _ROWS, _STRATA = 1, 2, 3, 4
MIXES = ("stratified", "shuffled")  # how an epoch of several sources orders its slots


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 (numpy wraps on overflow, on purpose)."""
    x = np.array(x, dtype=np.uint64, ndmin=1)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def derive_key(*parts: int) -> int:
    """Hash a tuple of non-negative ints to a 64-bit key."""
    h = np.array([_GOLDEN], dtype=np.uint64)
    for part in parts:
        h = mix64(h ^ np.uint64(part & _MASK))
    return int(h[0])


def permutation(key: int, n: int) -> np.ndarray:
    """A permutation of range(n) fixed by (key, n) alone: no RNG library, so no version drift."""
    values = mix64(np.arange(n, dtype=np.uint64) + np.uint64(key & _MASK))
    return np.argsort(values, kind="stable")


def shard_rows(seed: int, source: int, source_epoch: int, shard: int, n: int) -> np.ndarray:
    """Row t of a shard, read in its source's epoch `source_epoch`, is sample shard_rows(...)[t]."""
    return permutation(derive_key(seed, _ROWS, source, source_epoch, shard), n)


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder); every share is at least 1."""
    w = np.asarray(weights, dtype=np.float64)
    if total < len(w) or (w <= 0).any():
        raise ValueError(f"cannot give {len(w)} positive weights {list(w)} a share of {total}")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    while (counts == 0).any():  # a positive weight always gets a slot
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts.tolist()


def stratify(counts: Sequence[int], key: int) -> np.ndarray:
    """A permutation of the slots of groups of ``counts`` (group 0's first) that spreads every
    group evenly: the k-th slot of group i (of n_i) goes to place (k + u_i) / n_i in [0, 1), u_i
    a hashed phase in [0, 1), and the slots are sorted by place, ties broken by a hash.

    Each group's places are spaced exactly 1/n_i, so any run of m consecutive slots holds
    m * n_i / N of group i within 1 + (n_i / N) * (S - 2) for S groups: within 1 for two groups,
    2 for three (tests/test_data_order.py checks it against a slow reference). The phases change
    with ``key``, so which source leads differs from epoch to epoch.
    """
    counts = np.asarray(counts, dtype=np.int64)
    group = np.repeat(np.arange(len(counts)), counts)
    k = np.arange(len(group)) - np.repeat(np.cumsum(counts) - counts, counts)
    phase = mix64(np.arange(len(counts), dtype=np.uint64) + np.uint64(derive_key(key, 0) & _MASK))
    u = (phase >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 bits: exact in a float
    place = (k + u[group]) / counts[group]
    tie = mix64(np.arange(len(group), dtype=np.uint64) + np.uint64(derive_key(key, 1) & _MASK))
    return np.lexsort((tie, place))


def rank_positions(start: int, rank: int, world_size: int, count: int) -> np.ndarray:
    """The global positions rank `rank` reads: start + rank, start + rank + W, ... (`count`)."""
    return start + rank + world_size * np.arange(count, dtype=np.int64)


class GlobalOrder:
    """Maps global positions to (source, shard, row) for a set of sources with shard sizes."""

    def __init__(
        self,
        shard_sizes: Sequence[Sequence[int]],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        interleave: int = 8,
        mix: str = "stratified",
    ):
        self.sizes = [np.asarray(s, dtype=np.int64) for s in shard_sizes]
        if not self.sizes or any(len(s) == 0 or (s <= 0).any() for s in self.sizes):
            raise ValueError("every source needs at least one non-empty shard")
        if interleave < 1:
            raise ValueError("interleave must be >= 1")
        if mix not in MIXES:
            raise ValueError(f"mix {mix!r} is not one of {', '.join(MIXES)}")
        self.seed, self.interleave, self.mix = seed, interleave, mix
        counts = [len(s) for s in self.sizes]
        if weights is None or len(self.sizes) == 1:
            self.slots = counts  # every shard of every source once per epoch
        else:
            if len(weights) != len(self.sizes):
                raise ValueError(f"{len(weights)} weights for {len(self.sizes)} sources")
            # A slot of source i brings about mean_size_i samples: weight slots per sample.
            per_slot = [w / s.mean() for w, s in zip(weights, self.sizes)]
            self.slots = apportion(sum(counts), per_slot)
        self._starts = [0]

    @property
    def stratified(self) -> bool:
        """Whether the slots are spread by source: one source keeps the uniform permutation, so
        its order is the same under both mixes (and the same as before mixes existed)."""
        return self.mix == "stratified" and len(self.sizes) > 1

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, owned by a long-lived object
    def epoch_slots(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source, shard, source_epoch, size) of every slot of `epoch`, in read order."""
        parts = []
        for i, (sizes, n) in enumerate(zip(self.sizes, self.slots)):
            k = epoch * n + np.arange(n, dtype=np.int64)  # this source's k-th shard draw
            src_epoch, index = np.divmod(k, len(sizes))
            shard = np.empty(n, dtype=np.int64)
            for se in np.unique(src_epoch):
                sel = src_epoch == se
                perm = permutation(derive_key(self.seed, _SHARDS, i, int(se)), len(sizes))
                shard[sel] = perm[index[sel]]
            parts.append((np.full(n, i), shard, src_epoch))
        source, shard, src_epoch = (np.concatenate(p) for p in zip(*parts))
        if self.stratified:
            order = stratify(self.slots, derive_key(self.seed, _STRATA, epoch))
        else:
            order = permutation(derive_key(self.seed, _SLOTS, epoch), len(source))
        source, shard, src_epoch = source[order], shard[order], src_epoch[order]
        sizes = np.array([self.sizes[s][k] for s, k in zip(source, shard)], dtype=np.int64)
        return source, shard, src_epoch, sizes

    def epoch_start(self, epoch: int) -> int:
        """Global position of the first sample of `epoch`."""
        while len(self._starts) <= epoch:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + int(self.epoch_slots(e)[3].sum()))
        return self._starts[epoch]

    def locate(self, position: int) -> int:
        """The epoch that holds global position `position`."""
        while self._starts[-1] <= position:
            self.epoch_start(len(self._starts))
        return bisect.bisect_right(self._starts, position) - 1

    @lru_cache(maxsize=4)  # noqa: B019
    def stripe_starts(self, epoch: int) -> np.ndarray:
        """Offsets of the stripes of `epoch` within it, plus the epoch length at the end."""
        sizes = self.epoch_slots(epoch)[3]
        per_stripe = np.add.reduceat(sizes, np.arange(0, len(sizes), self.interleave))
        return np.concatenate([[0], np.cumsum(per_stripe)])

    @lru_cache(maxsize=4)  # noqa: B019
    def stripe_table(self, epoch: int, stripe: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, row) of each position of a stripe: row 0 of every slot, then row 1, ..."""
        first = stripe * self.interleave
        sizes = self.epoch_slots(epoch)[3][first : first + self.interleave]
        rows = np.repeat(np.arange(sizes.max()), len(sizes))
        slots = np.tile(np.arange(len(sizes)), int(sizes.max()))
        keep = rows < sizes[slots]
        return slots[keep] + first, rows[keep]

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, slot, row) for increasing global positions."""
        positions = np.asarray(positions, dtype=np.int64)
        epoch = np.empty_like(positions)
        slot = np.empty_like(positions)
        row = np.empty_like(positions)
        done = 0
        while done < len(positions):
            e = self.locate(int(positions[done]))
            start, end = self.epoch_start(e), self.epoch_start(e + 1)
            stop = done + int(np.searchsorted(positions[done:], end))
            local = positions[done:stop] - start
            starts = self.stripe_starts(e)
            stripe = np.searchsorted(starts, local, side="right") - 1
            for j in np.unique(stripe):
                sel = np.flatnonzero(stripe == j) + done
                slots, rows = self.stripe_table(e, int(j))
                q = positions[sel] - start - starts[j]
                slot[sel], row[sel] = slots[q], rows[q]
            epoch[done:stop] = e
            done = stop
        return epoch, slot, row

    def shard_plan(self, first: int, stride: int, stop: int | None) -> Iterator[tuple[int, int]]:
        """(epoch, slot) in the order positions first, first + stride, ... (< stop) need them."""
        x = first
        while stop is None or x < stop:
            e = self.locate(x)
            start, starts = self.epoch_start(e), self.stripe_starts(e)
            j = int(np.searchsorted(starts, x - start, side="right")) - 1
            end = start + int(starts[j + 1])
            if stop is not None:
                end = min(end, stop)
            q = np.arange(x - start - int(starts[j]), end - start - int(starts[j]), stride)
            slots = self.stripe_table(e, j)[0][q]
            _, first_seen = np.unique(slots, return_index=True)
            for s in slots[np.sort(first_seen)]:
                yield e, int(s)
            x += stride * len(q)
