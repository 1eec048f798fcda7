"""Process-group setup from torchrun or SLURM environments (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

# A generous timeout while ranks start (imports, JIT builds, first compile); a shorter one after.
STARTUP_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("TITANS_STARTUP_TIMEOUT_MIN", 20)))


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_launcher() -> DistEnv:
    """Rank layout from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, ...).

    SLURM variables are copied into the torchrun names, which DeepSpeed reads; without either,
    a single process (DeepSpeed would otherwise look for mpi4py).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 2000))
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))


def init_distributed() -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA)."""
    import deepspeed

    denv = env_from_launcher()
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=STARTUP_TIMEOUT
    )
    return denv


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
