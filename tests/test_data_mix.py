"""How an epoch orders the slots of several sources (data.mix): stratified spreads each source
evenly, shuffled is the uniform order of before; one source reads the same under both."""

import hashlib
import json

import numpy as np
import pytest
from data_helpers import shards_from_corpus, step_hashes

from titans_train.data import DataError, StreamingLoader
from titans_train.data.order import GlobalOrder, stratify


def probe(order, positions):
    """(source, shard, source epoch, row) at global positions."""
    epoch, slot, row = order.lookup(np.array(positions))
    out = []
    for e, s, r in zip(epoch.tolist(), slot.tolist(), row.tolist()):
        source, shard, src_epoch, _ = order.epoch_slots(e)
        out.append((int(source[s]), int(shard[s]), int(src_epoch[s]), r))
    return out


# Recorded from order.py before mixes existed (commit 2b24f7f): resumes of runs started then
# must read exactly these.
ONE_SOURCE = [
    (0, 5, 0, 0), (0, 6, 0, 0), (0, 6, 0, 4), (0, 1, 0, 3),
    (0, 1, 1, 0), (0, 7, 1, 2), (0, 0, 3, 0), (0, 6, 5, 0),
]  # fmt: skip
TWO_SOURCES = [(1, 28, 0, 0), (1, 27, 0, 113), (1, 11, 2, 164), (1, 8, 4, 40)]


@pytest.mark.parametrize("mix", ["stratified", "shuffled"])
def test_one_source_reads_as_before_under_both_mixes(mix):
    order = GlobalOrder([[7] * 9 + [3]], seed=5, interleave=4, mix=mix)
    assert probe(order, [0, 1, 17, 40, 66, 123, 200, 333]) == ONE_SOURCE
    assert not order.stratified


def test_shuffled_reads_the_order_of_before():
    order = GlobalOrder([[256] * 9, [256] * 40], [0.1, 0.9], seed=0, interleave=8, mix="shuffled")
    assert probe(order, [0, 5000, 20000, 40000]) == TWO_SOURCES
    stratified = GlobalOrder([[256] * 9, [256] * 40], [0.1, 0.9], seed=0, interleave=8)
    assert probe(stratified, [0, 5000, 20000, 40000]) != TWO_SOURCES


def window_deviation(groups: np.ndarray, i: int, share: float) -> float:
    """max over all windows [a, b) of |count of group i - (b - a) * share|: the slow way."""
    c = np.concatenate([[0], np.cumsum(groups == i)])
    n = len(groups)
    a, b = np.triu_indices(n + 1, 1)
    return float(np.abs((c[b] - c[a]) - (b - a) * share).max())


def test_stratify_spreads_every_source_within_the_bound():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sources = int(rng.integers(2, 7))
        counts = rng.integers(1, 50, sources)
        n = int(counts.sum())
        perm = stratify(counts.tolist(), int(rng.integers(0, 2**63)))
        assert sorted(perm.tolist()) == list(range(n))  # a permutation of the same slots
        groups = np.repeat(np.arange(sources), counts)[perm]
        for i in range(sources):
            k = np.flatnonzero(groups == i)
            assert (np.diff(perm[k]) > 0).all()  # a source keeps its own shard order
            dev = window_deviation(groups, i, counts[i] / n)
            assert dev <= 1 + counts[i] / n * (sources - 2) + 1e-9
            if sources <= 3:
                assert dev <= 2 + 1e-9


def test_the_shuffled_order_clumps_where_stratified_does_not():
    counts = [12, 108]
    shuffled = GlobalOrder([[4] * 12, [4] * 108], [0.1, 0.9], seed=0, mix="shuffled")
    groups = shuffled.epoch_slots(0)[0]
    assert window_deviation(groups, 0, 0.1) > 2  # the failure the stratified order fixes
    perm = stratify(counts, 0)
    assert window_deviation(np.repeat([0, 1], counts)[perm], 0, 0.1) <= 1


def corpus_rows(order: GlobalOrder, steps: int, batch: int = 16) -> np.ndarray:
    epoch, slot, _ = order.lookup(np.arange(steps * batch))
    source = np.concatenate(
        [order.epoch_slots(e)[0][slot[epoch == e]] for e in np.unique(epoch).tolist()]
    )
    return (source.reshape(steps, batch) == 0).sum(1)


def test_study_layout_every_batch_gets_its_corpus_rows():
    """The study's data (docs/results.md v2): 124 corpus and 36 recall shards of 256, weights
    0.1 and 0.9, 16 rows a step. Interleave 16 with the stratified order gives every step 1 to 3
    corpus rows, over two epochs; interleave 8 cannot (a stripe of 8 holds 0 or 1 corpus slot)."""
    sizes = [[256] * 123 + [169], [256] * 35 + [160]]
    order = GlobalOrder(sizes, [0.1, 0.9], seed=0, interleave=16)
    rows = corpus_rows(order, order.epoch_start(2) // 16)
    assert rows.min() >= 1 and rows.max() <= 3
    shuffled = GlobalOrder(sizes, [0.1, 0.9], seed=0, interleave=8, mix="shuffled")
    assert (corpus_rows(shuffled, 1200) == 0).sum() > 100


def test_an_unknown_mix_is_refused():
    with pytest.raises(ValueError, match="mix 'even' is not one of stratified, shuffled"):
        GlobalOrder([[4]], mix="even")


# -- the loader's state records the mix ------------------------------------------------------
KW = dict(seq_len=31, vocab_size=257, global_batch=8, micro_batch=2, seed=5, interleave=2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [
        shards_from_corpus(root, "a", 96, samples_per_shard=8),
        shards_from_corpus(root, "b", 40, seed=1, samples_per_shard=8),
    ]


def old_format(state: dict, loader: StreamingLoader, weights) -> dict:
    """``state`` as the loader wrote it before mixes existed: no "mix" key, and the fingerprint
    of the old formula (no mix in it)."""
    parts = [m.fingerprint("train") for m in loader.manifests] + ["train", weights, 5, 2]
    old = {k: v for k, v in state.items() if k != "mix"}
    old["fingerprint"] = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return old


def steps(loader, n):
    return [step_hashes(loader.next_step()) for _ in range(n)]


def test_a_state_saved_before_mixes_resumes_the_shuffled_order(sources):
    weights = [0.3, 0.7]
    shuffled = StreamingLoader(sources, weights=weights, mix="shuffled", **KW)
    head = steps(shuffled, 6)
    state = old_format(json.loads(json.dumps(shuffled.state_dict())), shuffled, weights)
    assert state["fingerprint"] == shuffled.state_dict()["fingerprint"]  # unchanged for shuffled
    rest = steps(shuffled, 6)
    again = StreamingLoader(sources, weights=weights, mix="shuffled", **KW)
    again.load_state_dict(state)
    assert steps(again, 6) == rest and head != rest
    stratified = StreamingLoader(sources, weights=weights, **KW)  # the default
    with pytest.raises(DataError, match="mix='shuffled' but .* mix='stratified'"):
        stratified.load_state_dict(state)


def test_a_stratified_state_round_trips_and_refuses_shuffled(sources):
    loader = StreamingLoader(sources, weights=[0.3, 0.7], **KW)
    steps(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["mix"] == "stratified"
    rest = steps(loader, 5)
    again = StreamingLoader(sources, weights=[0.3, 0.7], mix="stratified", **KW)
    again.load_state_dict(state)
    assert steps(again, 5) == rest
    other = StreamingLoader(sources, weights=[0.3, 0.7], mix="shuffled", **KW)
    with pytest.raises(DataError, match="mix='stratified' but .* mix='shuffled'"):
        other.load_state_dict(state)


def test_one_source_resumes_under_either_mix(sources):
    loader = StreamingLoader(sources[0], mix="shuffled", **KW)
    steps(loader, 3)
    state = old_format(loader.state_dict(), loader, None)
    rest = steps(loader, 4)
    stratified = StreamingLoader(sources[0], **KW)
    stratified.load_state_dict(state)  # the same order: nothing to refuse
    assert steps(stratified, 4) == rest
