"""Crash consistency: SIGKILL the whole process tree of a training job at seeded random moments
(before the first checkpoint, during two checkpoint saves, during start-up, after a checkpoint)
and restart it each time; the final parameters equal the uninterrupted run's bit for bit, every
step trained on the reference's samples, and metrics.jsonl holds every step once."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from launch_helpers import LAUNCH, STEPS, launch_env, run_args, samples_per_step
from trainer_helpers import consolidated, metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SEED = 11


def kill_tree(root: psutil.Process) -> int:
    """SIGKILL a process and every descendant. torchrun starts its workers as session leaders,
    so a process group kill misses them; walk the tree instead, stopping each process first so
    that none can fork a child (or be reparented to init) between the walk and the kill."""
    seen: dict[int, psutil.Process] = {}
    for _ in range(5):  # until a walk finds nothing new
        found = [root, *root.children(recursive=True)] if root.is_running() else []
        new = [p for p in found if p.pid not in seen]
        if not new:
            break
        for p in new:
            seen[p.pid] = p
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGSTOP)
    for p in seen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(seen.values()), timeout=60)
    return len(seen)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            steps.append(json.loads(line).get("step", 0))
    return max(steps)


def saving(run_dir: Path, step: int) -> bool:
    """Step ``step``'s checkpoint is being written: its directory holds files, no COMPLETE."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    try:
        return any(path.iterdir()) and not (path / "COMPLETE").exists()
    except OSError:
        return False


def plan(rng: random.Random) -> list[tuple[str, float]]:
    """Five kills in an order that always makes progress (checkpoints every 5 of 20 steps)."""
    return [
        ("after step", rng.randint(2, 4)),  # nothing committed yet: restart from scratch
        ("saving", 10),  # resumed from step 5
        ("seconds after the ranks start", rng.uniform(0.0, 4.0)),  # start-up, checkpoint load
        ("saving", 15),
        ("after step", rng.randint(16, 19)),  # rows past the step-15 checkpoint
    ]


def ranks(root: psutil.Process) -> int:
    try:
        return sum("titans_train.cli" in " ".join(p.cmdline()) for p in root.children(True))
    except psutil.Error:
        return 0


def test_sigkill_at_random_moments_resumes_bitwise(demo_shards, launch_reference, tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *run_args(demo_shards, run_dir)]
    env = launch_env(run_dir, NPROC_PER_NODE="2")
    mid_save = 0
    for attempt, (kind, when) in enumerate(plan(random.Random(SEED))):
        log = open(tmp_path / f"attempt{attempt}.log", "w")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        root, start, deadline = psutil.Process(proc.pid), time.monotonic(), time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if kind == "after step" and logged_step(run_dir) >= when:
                break
            if kind == "saving" and saving(run_dir, when):
                break
            if kind.startswith("seconds") and ranks(root) < 2:
                start = time.monotonic()  # the clock starts once both ranks exist
            elif kind.startswith("seconds") and time.monotonic() - start >= when:
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"attempt {attempt} ended before '{kind} {when}'"
        killed = kill_tree(root)
        log.close()
        assert killed >= 4, f"attempt {attempt}: only {killed} processes"  # bash, agent, 2 ranks
        if kind == "saving":
            mid_save += not (run_dir / "checkpoints" / f"step_{when:08d}" / "COMPLETE").exists()
    assert mid_save >= 1, "no kill landed inside a checkpoint save"

    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-4000:]
    name = f"step_{STEPS:08d}"
    got = consolidated(run_dir / "checkpoints" / name)
    want = consolidated(launch_reference / "checkpoints" / name)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert samples_per_step(run_dir) == samples_per_step(launch_reference)
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step logged twice or lost"
    ref = {r["step"]: r["loss"] for r in metrics(launch_reference) if "loss" in r}
    assert {r["step"]: r["loss"] for r in rows} == ref
