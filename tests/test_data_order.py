"""The global order and the packer against slow, obvious reference implementations."""

import numpy as np
import pytest
from data_helpers import shards_from_corpus

from data_pipelines.packing import document_ends, pack_tokens, split_documents
from titans_train.data import StreamingLoader
from titans_train.data.order import (
    GlobalOrder,
    apportion,
    derive_key,
    mix64,
    permutation,
    rank_positions,
    shard_rows,
)

M64 = (1 << 64) - 1


def ref_mix64(x: int) -> int:
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_key(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ref_mix64(h ^ p)
    return h


def ref_permutation(key: int, n: int) -> list[int]:
    return sorted(range(n), key=lambda i: ref_mix64(key + i))


def ref_stratify(counts, key):
    """Slot ids (source 0's first) sorted by place (k + u_i) / n_i, ties by a hash of the id."""
    u = [(ref_mix64(ref_key(key, 0) + i) >> 11) * 2.0**-53 for i in range(len(counts))]
    slots = [(i, k) for i, n in enumerate(counts) for k in range(n)]

    def place(j):
        i, k = slots[j]
        return (k + u[i]) / counts[i], ref_mix64(ref_key(key, 1) + j)

    return sorted(range(len(slots)), key=place)


def ref_epoch(sizes, slots, seed, interleave, epoch, mix="shuffled"):
    """(source, shard, row before the in-shard permutation) of every position of `epoch`."""
    draws = []
    for i, (shard_sizes, n) in enumerate(zip(sizes, slots)):
        for j in range(n):
            src_epoch, index = divmod(epoch * n + j, len(shard_sizes))
            draws.append(
                (i, ref_permutation(ref_key(seed, 1, i, src_epoch), len(shard_sizes))[index])
            )
    if mix == "stratified" and len(sizes) > 1:
        order = ref_stratify(slots, ref_key(seed, 4, epoch))
    else:  # "shuffled", and one source under either mix
        order = ref_permutation(ref_key(seed, 2, epoch), len(draws))
    draws = [draws[m] for m in order]
    out = []
    for first in range(0, len(draws), interleave):
        stripe = draws[first : first + interleave]
        for t in range(max(sizes[i][s] for i, s in stripe)):
            out += [(i, s, t) for i, s in stripe if t < sizes[i][s]]
    return out


def test_hash_and_permutation_match_reference():
    xs = [0, 1, 2**63, M64, 123456789]
    assert mix64(np.array(xs, dtype=np.uint64)).tolist() == [ref_mix64(x) for x in xs]
    assert derive_key(7, 1, 2) == ref_key(7, 1, 2)
    for n in (0, 1, 5, 100):
        assert permutation(derive_key(3), n).tolist() == ref_permutation(ref_key(3), n)
    assert permutation(1, 50).tolist() != permutation(2, 50).tolist()


@pytest.mark.parametrize(
    "sizes,weights,interleave",
    [
        ([[5, 5, 5, 5, 3]], None, 2),  # one source, short last shard
        ([[4] * 7 + [1]], None, 8),  # fewer shards than the interleave
        ([[6, 6, 2], [3, 3, 3, 3, 1]], [0.7, 0.3], 3),  # weighted mix, unequal shard sizes
        ([[4] * 9, [5, 5], [3] * 4], [0.5, 0.2, 0.3], 4),  # three sources
        ([[2] * 3, [3] * 5], None, 2),  # two sources, unweighted: every shard once
    ],
)
@pytest.mark.parametrize("mix", ["stratified", "shuffled"])
def test_lookup_matches_reference_over_epochs(sizes, weights, interleave, mix):
    order = GlobalOrder(sizes, weights, seed=11, interleave=interleave, mix=mix)
    expected = [x for e in range(3) for x in ref_epoch(sizes, order.slots, 11, interleave, e, mix)]
    positions = np.arange(order.epoch_start(3))
    epoch, slot, row = order.lookup(positions)
    got = []
    for e, s, t in zip(epoch, slot, row):
        source, shard = order.epoch_slots(int(e))[:2]
        got.append((int(source[s]), int(shard[s]), int(t)))
    assert got == expected
    if weights is None:  # unweighted: every epoch is every (source, shard, row) once
        n = order.epoch_start(1)
        assert all(order.epoch_start(e) == e * n for e in range(4))
        assert len(set(got[:n])) == n == sum(map(sum, sizes))


def test_shard_rows_and_locate():
    assert shard_rows(3, 0, 1, 2, 9).tolist() == ref_permutation(ref_key(3, 3, 0, 1, 2), 9)
    order = GlobalOrder([[4, 4, 1]], seed=0)
    assert [order.locate(p) for p in (0, 8, 9, 17, 18, 90)] == [0, 0, 1, 1, 2, 10]


def test_shard_plan_is_first_need_order_of_rank_positions():
    order = GlobalOrder([[5, 5, 5, 5, 5, 2]], seed=3, interleave=4)
    for world, rank, start in [(1, 0, 0), (2, 1, 7), (3, 2, 40)]:
        stop = order.epoch_start(2)
        positions = np.arange(start + rank, stop, world)
        epoch, slot, _ = order.lookup(positions)
        expected = list(dict.fromkeys(zip(epoch.tolist(), slot.tolist())))
        assert list(order.shard_plan(start + rank, world, stop)) == expected


def test_ranks_read_disjoint_slots_when_world_divides_interleave():
    order = GlobalOrder([[8] * 16], seed=0, interleave=4)
    plans = [set(order.shard_plan(r, 2, order.epoch_start(1))) for r in range(2)]
    assert not plans[0] & plans[1] and len(plans[0] | plans[1]) == 16


def test_rank_slices_partition_each_global_batch():
    g, start = 12, 36
    for world in (1, 2, 3, 4):
        got = sorted(
            p for r in range(world) for p in rank_positions(start, r, world, g // world).tolist()
        )
        assert got == list(range(start, start + g))


def test_mixing_follows_weights():
    sizes = [[10] * 20, [10] * 5]
    order = GlobalOrder(sizes, [0.25, 0.75], seed=1, interleave=4)
    assert order.slots == apportion(25, [0.25 / 10, 0.75 / 10]) == [6, 19]
    # shares are whole slots per mixed epoch: off by at most one slot in 25
    source = np.concatenate([order.epoch_slots(e)[0] for e in range(6)])
    assert abs((source == 1).mean() - 0.75) <= 1 / 25
    # the upsampled source cycles through its own epochs: every shard equally often
    counts = np.bincount(
        np.concatenate([order.epoch_slots(e)[1][order.epoch_slots(e)[0] == 1] for e in range(5)]),
        minlength=5,
    )
    assert counts.tolist() == [19] * 5


def test_apportion():
    assert apportion(10, [1, 1]) == [5, 5]
    assert sum(apportion(7, [0.5, 0.3, 0.2])) == 7
    assert apportion(5, [1000, 1]) == [4, 1]
    assert apportion(4, [0.5, 0.3, 0.2]) == [2, 1, 1]


def test_split_documents_is_seeded_and_exact():
    a = split_documents(100, seed=5, val_fraction=0.1)
    assert len(a["val"]) == 10 and sorted(np.concatenate([a["val"], a["train"]])) == list(
        range(100)
    )
    assert a["val"].tolist() == split_documents(100, 5, 0.1)["val"].tolist()
    assert a["val"].tolist() != split_documents(100, 6, 0.1)["val"].tolist()


def test_pack_tokens_matches_concatenation():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, int(n)) for n in rng.integers(0, 30, 40)]
    stream = np.concatenate([np.append(d, 99) for d in docs])
    ref_starts = np.concatenate([[0], np.flatnonzero(stream == 99)[:-1] + 1])
    ends = document_ends([len(d) for d in docs])

    def fetch(j, lo, hi):
        return docs[j][lo:hi]

    for start, stop in [
        (0, 7),
        (5, 64),
        (31, 200),
        (0, len(stream)),
        (len(stream) - 3, len(stream)),
    ]:
        tokens, starts = pack_tokens(ends, start, stop, fetch, 99, "uint16")
        assert tokens.tolist() == stream[start:stop].tolist()
        assert starts.tolist() == [s for s in ref_starts if start <= s < stop]


def test_loader_follows_the_reference_order(tmp_path):
    path = shards_from_corpus(tmp_path, "s", 44, samples_per_shard=8)  # shards 8 x 5 + 4
    loader = StreamingLoader(
        path, seq_len=31, vocab_size=257, global_batch=4, micro_batch=2, seed=9, interleave=3
    )
    got = [tuple(r) for _ in range(22) for mb in loader.next_step() for r in mb.sample_ids.tolist()]
    sizes = [[8] * 5 + [4]]
    expected = [
        (i, s, ref_permutation(ref_key(9, 3, i, e, s), sizes[i][s])[t])
        for e in range(2)
        for i, s, t in ref_epoch(sizes, [6], 9, 3, e)
    ]
    assert got == expected
