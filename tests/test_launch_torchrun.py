"""launch/torchrun.sh without a scheduler: two nodes through a c10d rendezvous, a rank killed
under --max-restarts, a hung rank named by the others' timeout, and a stop signal."""

import os
import signal
import subprocess
import time

import pytest
import torch
from launch_helpers import (
    INTERVAL,
    LAUNCH,
    STEPS,
    launch_env,
    run_args,
    samples_per_step,
    wait_for_step,
    wandb_run_ids,
    worker_pids,
)
from slurm_cluster import free_port
from trainer_helpers import consolidated, losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
FINAL = f"step_{STEPS:08d}"


def test_two_nodes_through_c10d_match_one_node(demo_shards, launch_reference, tmp_path):
    """Two torchrun agents on 127.0.0.1 act as two nodes of one process each."""
    run_dir = tmp_path / "run"
    nodes = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes.update(RDZV_ID="two-nodes", NPROC_PER_NODE="1")
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *run_args(demo_shards, run_dir)]
    agents = []
    for node in range(2):
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        env = launch_env(run_dir, NODE_RANK=str(node), **nodes)
        agents.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
    for proc, log in agents:
        proc.wait(timeout=600)
        log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert [p.returncode for p, _ in agents] == [0, 0], "\n\n".join(t[-3000:] for t in logs)
    got, want = losses(run_dir), losses(launch_reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bitwise: same world size, same ranks, same reduction order
    assert samples_per_step(run_dir) == samples_per_step(launch_reference)
    assert sorted(p.name for p in run_dir.glob("samples.rank*.jsonl")) == [
        "samples.rank0.jsonl",
        "samples.rank1.jsonl",
    ]


def test_killed_rank_restarts_from_the_last_checkpoint(demo_shards, launch_reference, tmp_path):
    """SIGKILL of rank 1 mid-run under MAX_RESTARTS=1: torchrun restarts the group, which
    resumes from the newest complete checkpoint and ends exactly where the reference ends."""
    run_dir = tmp_path / "run"
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *run_args(demo_shards, run_dir)]
    env = launch_env(run_dir, NPROC_PER_NODE="2", MAX_RESTARTS="1", SHUTDOWN_TIMEOUT="5")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        wait_for_step(run_dir, INTERVAL + 2, proc)
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
        proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "failed (exitcode: -9) local_rank: 1" in text  # torchrun saw the kill, restarted
    resumed = [line for line in text.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and "step_0000" in resumed[0], resumed
    got, want = losses(run_dir), losses(launch_reference)
    assert got == want  # the re-run steps replaced the lost ones, bit for bit
    final, ref = (
        consolidated(run_dir / "checkpoints" / FINAL),
        consolidated(launch_reference / "checkpoints" / FINAL),
    )
    assert final.keys() == ref.keys()
    for key in ref:
        assert torch.equal(final[key], ref[key]), key
    assert samples_per_step(run_dir) == samples_per_step(launch_reference)
    assert len(wandb_run_ids(run_dir)) == 1


def test_hung_rank_is_named_after_the_short_timeout(demo_shards, tmp_path):
    """Rank 1 stops responding in step 4 (outside any collective). After 2 steps the groups
    switched to the 5 s timeout, so rank 0 fails within seconds and names rank 1."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    args = run_args(demo_shards, run_dir, "debug.hang_at_step=4", "debug.hang_rank=1", steps=6)
    args += ["launch.timeout=5", "launch.timeout_after_steps=2"]
    env = launch_env(run_dir, NPROC_PER_NODE="2")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", str(LAUNCH / "torchrun.sh"), *args], env=env, stdout=out, stderr=out
        )
        wait_for_step(run_dir, 3, proc)
        hung = worker_pids(proc.pid)[1]
        deadline = time.monotonic() + 120
        while "ranks behind this one" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        # torchrun waits 30 s before it SIGKILLs a worker that survives SIGTERM; don't.
        os.kill(hung, signal.SIGKILL)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode != 0
    assert "rank 0/2 (host" in err and "failed in step 4" in err, err[-4000:]
    assert "ranks behind this one (stuck or dead?): rank 1 in step 4 (loading data)" in err


def test_stop_signal_checkpoints_and_exits_for_requeue(demo_shards, tmp_path):
    """SIGUSR1 to torchrun.sh: forwarded to the ranks, which agree on a step, checkpoint it and
    stop; torchrun.sh exits 85. (Resuming from it: test_launch_slurm.py.)"""
    run_dir = tmp_path / "run"
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *run_args(demo_shards, run_dir)]
    env = launch_env(run_dir, NPROC_PER_NODE="2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 85, err[-4000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopping at step")]
    assert len(stopped) == 1 and stopped[0].endswith(": SIGUSR1"), stopped
    step = int(stopped[0].split()[3].rstrip(":"))
    assert step < STEPS
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    assert f"torchrun.sh: requeue step={step} reason=SIGUSR1" in err
