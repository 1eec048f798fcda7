"""Resuming on another world size through DeepSpeed's universal checkpoint (ZeRO-2): 2 ranks ->
1 and 1 -> 2. The loss must continue the uninterrupted curve (DeepSpeed #6691 reports converted
runs that train as if from scratch) and every step must train on exactly its samples."""

import shutil

import pytest
from launch_helpers import INTERVAL, STEPS, assert_same_samples, samples_per_step, torchrun_sh
from trainer_helpers import losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
RESUME_AT = 2 * INTERVAL
TOLERANCE = 1e-3  # reduction order differs between 1 and 2 ranks: ~1e-7 at first, growing


def truncate_at(src, dst, step: int):
    """A copy of a run as it was right after its checkpoint at ``step``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb*", "samples.*", "metrics.*"))
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return dst


def assert_continues(run_dir, reference):
    got, want = losses(run_dir), losses(reference)
    after = range(RESUME_AT + 1, STEPS + 1)
    assert sorted(got) == list(after)
    for step in after:
        assert abs(got[step] - want[step]) < TOLERANCE, (step, got[step], want[step])
    # Trained as if from scratch, the first loss after resuming would be near the step-1 loss.
    assert got[RESUME_AT + 1] < want[1] - 0.5
    assert_same_samples(samples_per_step(run_dir), samples_per_step(reference), after)


def test_two_ranks_resume_on_one(demo_shards, launch_reference, tmp_path):
    run_dir = truncate_at(launch_reference, tmp_path / "run", RESUME_AT)
    proc = torchrun_sh(demo_shards, run_dir, nproc=1)
    assert "loading ZeRO-2 state through DeepSpeed's universal checkpoint" in proc.stderr
    assert (run_dir / "checkpoints" / f"step_{RESUME_AT:08d}" / "universal").is_dir()
    assert_continues(run_dir, launch_reference)


def test_one_rank_resumes_on_two(demo_shards, launch_reference, tmp_path):
    """One rank trains to the checkpoint; two ranks continue. The two-rank reference is the
    uninterrupted curve (1 and 2 ranks agree to ~1e-6 over these steps: test_train.py)."""
    one = tmp_path / "one"  # the same schedule (max_steps) as the reference, killed at RESUME_AT
    torchrun_sh(demo_shards, one, f"debug.kill_after_step={RESUME_AT}", nproc=1, check=False)
    first = losses(one)
    for step in range(1, RESUME_AT + 1):
        assert abs(first[step] - losses(launch_reference)[step]) < TOLERANCE
    run_dir = truncate_at(one, tmp_path / "run", RESUME_AT)
    proc = torchrun_sh(demo_shards, run_dir, nproc=2)
    assert "saved by 1 ranks and this run has 2" in proc.stderr
    assert_continues(run_dir, launch_reference)
