"""data.mix through the trainer: a run saved before the key existed resumes in the shuffled
order it started with (data.mix=auto, the default), bitwise; an explicit other mix is refused,
named; a new run saves the mix it used."""

import json

import pytest
from trainer_helpers import losses, train_here

from titans_train import checkpoint as ckpt


def two_sources(data) -> list[str]:
    # The same shards twice: two sources to order, one manifest to build.
    return [f"data.train=[{data},{data}]", "data.weights=[0.3,0.7]"]


def as_saved_before_mix(step) -> None:
    """Edit a checkpoint of a shuffled run into what an earlier version wrote: no data.mix in
    its config, no "mix" in its loader state (its fingerprint is the same), then re-commit."""
    state = json.loads((step / ckpt.STATE).read_text())
    assert state["config"]["data"].pop("mix") == "shuffled"
    assert state["data"].pop("mix") == "shuffled"
    (step / ckpt.STATE).write_text(json.dumps(state, indent=1))
    marker = json.loads((step / ckpt.MARKER).read_text())
    marker["files"][ckpt.STATE] = (step / ckpt.STATE).stat().st_size
    if marker.get("digests"):
        marker["digests"][ckpt.STATE] = ckpt.file_digest(step / ckpt.STATE, marker["checksum"])
    (step / ckpt.MARKER).write_text(json.dumps(marker))


def saved(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / ckpt.STATE).read_text())


@pytest.mark.slow
def test_a_run_saved_before_mix_resumes_its_shuffled_order(demo_shards, tmp_path):
    mix = two_sources(demo_shards)
    reference = tmp_path / "reference"
    assert train_here(demo_shards, reference, 4, *mix, "data.mix=shuffled").returncode == 0

    run = tmp_path / "old"
    assert train_here(demo_shards, run, 2, *mix, "data.mix=shuffled").returncode == 0
    as_saved_before_mix(run / "checkpoints" / "step_00000002")
    refused = train_here(demo_shards, run, 4, *mix, "data.mix=stratified")
    assert refused.returncode != 0
    assert "data.mix: 'shuffled' -> 'stratified'" in refused.stderr
    resumed = train_here(demo_shards, run, 4, *mix)  # data.mix=auto: the checkpoint's
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "data.mix=auto: shuffled" in resumed.stderr
    assert [losses(run)[s] for s in (3, 4)] == [losses(reference)[s] for s in (3, 4)]
    state = saved(run, 4)
    assert state["config"]["data"]["mix"] == state["data"]["mix"] == "shuffled"

    fresh = tmp_path / "new"
    assert train_here(demo_shards, fresh, 2, *mix).returncode == 0
    state = saved(fresh, 2)
    assert state["config"]["data"]["mix"] == state["data"]["mix"] == "stratified"
    assert losses(fresh)[2] != losses(reference)[2]  # another order: other batches
