"""Helpers for the launcher tests: the tiny run through launch/torchrun.sh or SLURM, and what it
left behind (losses, sample ids per step, W&B run ids, consolidated parameters)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from distributed import ROOT
from trainer_helpers import EXPERIMENT, base_overrides
from wandb_helpers import clean_env, wandb_home

LAUNCH = ROOT / "launch"
STEPS = 20  # long enough that a signal sent after step 2 lands mid-run
INTERVAL = 5  # checkpoint interval


def run_args(data: Path, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """Trainer arguments: the tiny config, every checkpoint kept, sample ids recorded."""
    overrides = base_overrides(data, run_dir, steps) + [
        f"checkpoint.interval={INTERVAL}",
        "checkpoint.keep_last=10",
        "debug.record_samples=true",
        *extra,
    ]
    return ["--config", str(EXPERIMENT), *overrides]


def launch_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a launched run: W&B offline inside run_dir, this interpreter."""
    env = clean_env(WANDB_MODE="offline", **wandb_home(Path(run_dir) / "wandb-home"))
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def torchrun_sh(
    data, run_dir, *extra, nproc=2, env=None, check=True, timeout=600, steps=STEPS
) -> subprocess.CompletedProcess:
    """launch/torchrun.sh on this machine (one node) with the tiny run."""
    full_env = launch_env(run_dir, NPROC_PER_NODE=str(nproc), **(env or {}))
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *run_args(data, run_dir, *extra, steps=steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun.sh failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def wait_for_step(run_dir: Path, step: int, proc=None, timeout: float = 300) -> None:
    """Until rank 0 has logged ``step`` (metrics.jsonl), failing early if ``proc`` ended."""
    path = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            steps = [r["step"] for r in rows if "step" in r]  # header lines have no step
            if steps and max(steps) >= step:
                return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no step {step} in {path} after {timeout} s")
        time.sleep(0.1)


def samples_per_step(run_dir: Path) -> dict[int, list[tuple]]:
    """step -> the sorted sample ids all ranks trained on; a step run twice (a restart) counts
    once, with its last attempt's samples."""
    out: dict[int, list[tuple]] = {}
    attempts: dict[tuple[int, str], list[tuple]] = {}
    for path in sorted(Path(run_dir).glob("samples.rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            attempts[(row["step"], path.name)] = [tuple(s) for s in row["samples"]]
    for (step, _), ids in attempts.items():
        out.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in out.items()}


def assert_same_samples(got: dict, want: dict, steps) -> None:
    """Each step trained on exactly the reference's samples; nothing repeated or skipped."""
    for step in steps:
        assert got[step] == want[step], f"step {step}: different samples"
    every = Counter(s for step in steps for s in got[step])
    assert max(every.values()) == 1, "a sample was trained on twice"


def wandb_run_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (Path(run_dir) / "wandb").glob("offline-run-*")}


def worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of the training processes below ``parent`` (torchrun's workers)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if not _descends_from(int(proc.name), parent):
                continue
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK=") and b"TORCHELASTIC_RUN_ID=" in b"\0".join(env):
                found[int(item[5:])] = int(proc.name)
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False
