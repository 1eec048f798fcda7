"""launch/slurm.sbatch on a real single-node SLURM (tests/slurm_cluster.py): a job that trains
and checkpoints, preempted by its early-warning signal on the way, so that it also checkpoints,
requeues itself and resumes into the same W&B run; the wall-time guard stopping a job before its
end; a cancelled job."""

import subprocess
from pathlib import Path

import pytest
from launch_helpers import LAUNCH, STEPS, launch_env, run_args, wait_for_step, wandb_run_ids
from trainer_helpers import losses

from titans_train.checkpoint import incomplete_reason

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def submit(slurm, data, run_dir: Path, *extra: str, sbatch: tuple[str, ...] = ()) -> str:
    """launch/submit.sh with the tiny run: one node, 2 CPUs (so 2 processes), 10 minutes."""
    env = launch_env(run_dir, SLURM_CONF=slurm.env["SLURM_CONF"], LOG_DIR=str(run_dir) + "-logs")
    cmd = ["bash", str(LAUNCH / "submit.sh"), "--cpus-per-task=2", "--time=10", *sbatch, "--"]
    cmd += run_args(data, run_dir, *extra)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.split()[2].rstrip(";")
    assert f"log: {run_dir}-logs/titans-{job}.log" in out.stdout
    return job


def job_log(slurm, job: str) -> str:
    return Path(slurm.job_field(job, "StdOut")).read_text(errors="replace").replace("\r", "\n")


@pytest.fixture(scope="module")
def preempted(slurm, demo_shards, launch_reference, tmp_path_factory):
    """One job for the two tests below: the early-warning signal (what --signal=B:USR1@300
    sends) mid-run; it checkpoints, exits 85, requeues itself and runs to the end."""
    run_dir = tmp_path_factory.mktemp("preempted") / "run"
    job = submit(slurm, demo_shards, run_dir)
    wait_for_step(run_dir, 2)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    state = slurm.wait_state(job, DONE, timeout=600)
    return job, run_dir, state, job_log(slurm, job)


def test_sbatch_job_trains_and_checkpoints(slurm, preempted, launch_reference):
    job, run_dir, state, log = preempted
    assert state == "COMPLETED", log[-4000:]
    port = 29500 + int(job) % 2000
    assert f"job {job}, attempt 1, nodes {slurm.host}, rendezvous {slurm.host}:{port}" in log
    assert incomplete_reason(run_dir / "checkpoints" / f"step_{STEPS:08d}") is None
    assert losses(run_dir) == losses(launch_reference)  # 2 processes from the 2 CPUs, bitwise


def test_preempted_job_requeues_and_resumes(slurm, preempted, launch_reference):
    """Checkpoint, exit 85, `scontrol requeue`, auto-resume; the final loss is the
    uninterrupted run's, one W&B run."""
    job, run_dir, state, log = preempted
    assert state == "COMPLETED", log[-4000:]
    assert slurm.job_field(job, "Restarts") == "1"
    stopped = [line for line in log.splitlines() if line.startswith("stopping at step")]
    assert len(stopped) == 1 and stopped[0].endswith(": SIGUSR1"), stopped
    step = int(stopped[0].split()[3].rstrip(":"))
    for line in (
        "slurm.sbatch: SIGUSR1: forwarding it to the training step",
        f"torchrun.sh: requeue step={step} reason=SIGUSR1",
        "slurm.sbatch: training step exited with 85",
        f"slurm.sbatch: requeueing job {job}",
        f"job {job}, attempt 2",
        f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}",
    ):
        assert line in log, line
    got, want = losses(run_dir), losses(launch_reference)
    assert got[STEPS] == want[STEPS] and got == want
    assert len(wandb_run_ids(run_dir)) == 1


def test_walltime_guard_stops_before_the_end(slurm, demo_shards, tmp_path):
    """No signal: the job's time limit is cut to 6 minutes mid-run, which leaves less than the
    400 s margin, so the guard (polling every second) checkpoints, stops and requeues. The
    requeued attempt starts with less than the margin left and fails instead of looping.
    The guard fires at once, and the save and requeue have 6 minutes minus the time to step 2
    before SLURM's limit (with a 2-minute limit, a slow save under load lost the requeue)."""
    run_dir = tmp_path / "run"
    margin = ("launch.walltime_margin=400", "launch.walltime_poll=1")
    job = submit(slurm, demo_shards, run_dir, *margin, sbatch=("--signal=B:USR1@5",))
    wait_for_step(run_dir, 2)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=6")
    state = slurm.wait_state(job, DONE, timeout=600)
    log = job_log(slurm, job)
    stopped = [line for line in log.splitlines() if line.startswith("stopping at step")]
    assert len(stopped) >= 1 and "wall-time guard (" in stopped[0], log[-4000:]
    assert "s left in the allocation)" in stopped[0]
    step = int(stopped[0].split()[3].rstrip(":"))
    assert step < STEPS
    assert incomplete_reason(run_dir / "checkpoints" / f"step_{step:08d}") is None
    assert f"slurm.sbatch: requeueing job {job}" in log
    assert "the wall-time guard stopped the run before its first step" in log
    assert state == "FAILED" and slurm.job_field(job, "Restarts") == "1"


def test_cancelled_job_checkpoints_and_stays_cancelled(slurm, demo_shards, tmp_path):
    """scancel sends SIGTERM to every process of the job: the ranks checkpoint within KillWait
    (W&B's service dies with the signal; training does not), and nothing requeues the job."""
    run_dir = tmp_path / "run"
    job = submit(slurm, demo_shards, run_dir)
    wait_for_step(run_dir, 2)
    slurm.run("scancel", job)
    assert slurm.wait_state(job, DONE, timeout=300) == "CANCELLED"
    log = job_log(slurm, job)
    stopped = [line for line in log.splitlines() if line.startswith("stopping at step")]
    assert len(stopped) == 1 and stopped[0].endswith(": SIGTERM"), log[-4000:]
    step = int(stopped[0].split()[3].rstrip(":"))
    assert incomplete_reason(run_dir / "checkpoints" / f"step_{step:08d}") is None
    assert "slurm.sbatch: SIGTERM: the job is being cancelled" in log
    assert "requeued" not in log and slurm.job_field(job, "Restarts") == "0"
