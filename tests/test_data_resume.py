"""Tests 2-4: exact resume (1 and 2 ranks x 0 and 2 workers), elastic resume, no hang."""

import json
import os

import pytest
from data_helpers import plain_read, row_hash, shards_from_corpus, step_hashes
from distributed import ROOT, torchrun

from titans_train.data import StreamingLoader

KW = dict(seq_len=31, vocab_size=257, micro_batch=2, seed=7, interleave=4)
EPOCH = 104  # samples in the train split of `data`; 12 per shard, the last shard holds 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shards_from_corpus(root, "shards", EPOCH)
    shards_from_corpus(root, "uneven", 30, seed=1)  # shards of 12, 12, 6
    return root


def run_steps(loader, n):
    return [step_hashes(loader.next_step()) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_one_rank(data, num_workers):
    shards = str(data / "shards")
    full = StreamingLoader(shards, global_batch=12, num_workers=num_workers, **KW)
    head = run_steps(full, 9)
    state = json.loads(json.dumps(full.state_dict()))
    assert state["samples"] == 9 * 12 and state["epoch"] == 1
    rest = run_steps(full, 7)
    resumed = StreamingLoader(shards, global_batch=12, num_workers=num_workers, **KW)
    resumed.load_state_dict(state)
    assert run_steps(resumed, 7) == rest
    reference = StreamingLoader(shards, global_batch=12, num_workers=0, **KW)
    assert run_steps(reference, 16) == head + rest  # the worker count changes nothing


def test_rank_slices_reassemble_the_one_rank_order(data):
    shards = str(data / "shards")
    one = run_steps(StreamingLoader(shards, global_batch=8, **KW), 20)
    for world in (2, 4):
        ranks = [
            StreamingLoader(shards, global_batch=8, rank=r, world_size=world, **KW)
            for r in range(world)
        ]
        per_rank = [run_steps(loader, 20) for loader in ranks]
        for step in range(20):  # rank r holds positions P + r, P + r + W, ...
            merged = [per_rank[k % world][step][k // world] for k in range(8)]
            assert merged == one[step]


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """One torchrun launch for all 2-rank scenarios, plus the 1-rank halves around it."""
    out = tmp_path_factory.mktemp("dist")
    shards = str(data / "shards")
    one = StreamingLoader(shards, global_batch=8, max_epochs=1, **KW)
    head = run_steps(one, 6)
    with open(out / "state6.json", "w") as f:
        json.dump(one.state_dict(), f)
    torchrun(
        ROOT / "tests" / "scripts" / "data_resume.py",
        *["--data", shards, "--uneven", str(data / "uneven"), "--out", str(out)],
        *["--state-in", str(out / "state6.json")],
        env={"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},  # for data_helpers
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "one_rank_head": head}


def all_samples(data, name="shards"):
    return sorted(row_hash(s) for s in plain_read(str(data / name)))


@pytest.mark.slow
@pytest.mark.distributed
def test_exact_resume_two_ranks(two_ranks):
    for rank in two_ranks["ranks"]:
        for nw in ("nw0", "nw2"):
            assert rank[nw]["resumed"] == rank[nw]["full"][9:16]
        assert rank["nw0"]["full"] == rank["nw2"]["full"]


@pytest.mark.slow
@pytest.mark.distributed
def test_elastic_two_ranks_to_one(data, two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert r0["head_state"] == r1["head_state"] and r0["head_state"]["samples"] == 40
    one = StreamingLoader(str(data / "shards"), global_batch=8, max_epochs=1, **KW)
    reference = run_steps(one, 5)
    for step in range(5):  # the same global batches whatever the world size
        assert sorted(r0["head"][step] + r1["head"][step]) == sorted(reference[step])
    resumed = StreamingLoader(str(data / "shards"), global_batch=8, max_epochs=1, **KW)
    resumed.load_state_dict(r0["head_state"])
    seen = [h for rank in (r0, r1) for step in rank["head"] for h in step]
    seen += [h for step in resumed for h in step_hashes(step)]
    assert sorted(seen) == all_samples(data)  # no duplicate, no gap over the epoch


@pytest.mark.slow
@pytest.mark.distributed
def test_elastic_one_rank_to_two(data, two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert len(r0["tail"]) == len(r1["tail"]) == EPOCH // 8 - 6
    seen = [h for step in two_ranks["one_rank_head"] for h in step]
    seen += [h for rank in (r0, r1) for step in rank["tail"] for h in step]
    assert sorted(seen) == all_samples(data)


@pytest.mark.slow
@pytest.mark.distributed
def test_no_hang_with_uneven_shards(data, two_ranks):
    r0, r1 = (rank["uneven"] for rank in two_ranks["ranks"])
    assert r0["steps"] == r1["steps"] == [7, 7]  # 30 samples, global batch 4
    rows = r0["rows"] + r1["rows"]
    assert len(rows) == len(set(rows)) == 28 and set(rows) <= set(all_samples(data, "uneven"))
