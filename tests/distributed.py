"""Helpers for tests that spawn `torchrun` with 2 CPU processes (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(
    script: str | Path, *args: str, nproc: int = 2, timeout: int = 600, env=None, check=True
):
    """Run a script (or ``-m module``) under torchrun --standalone; returns the CompletedProcess
    (output captured). With ``check`` a non-zero exit fails with the tail of stderr."""
    full_env = dict(os.environ)
    full_env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{full_env.get('PYTHONPATH', '')}",
    )
    full_env.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *([str(script)] if script != "-m" else ["-m"]),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc
