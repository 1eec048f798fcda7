"""Process-group setup from torchrun or SLURM environments (gloo on CPU, NCCL on CUDA), its
timeouts, and failure messages that name the rank.

Device and backend: one source of truth, DeepSpeed's accelerator (``DS_ACCELERATOR``, else what
DeepSpeed detects). ``device()`` is where the trainer puts batches and where DeepSpeed puts the
model; ``DS_ACCELERATOR=cpu`` means CPU and gloo even on a host with GPUs.

The group on a GPU is ``"cpu:gloo,cuda:nccl"`` (torch's own default for a group serving both
devices), not plain ``"nccl"``: NCCL serves CUDA tensors only, and the trainer's host-side
collectives (the preemption flags, the logged loss, the validation totals, checkpoint bookkeeping)
hold CPU tensors. Those values live on the host anyway (signals, Python floats), so gloo is their
natural transport and they never touch the CUDA stream; gradients still go over NCCL. Any CPU
collective added later works instead of failing at step 1. The cost is one gloo connection per
group: across nodes gloo must reach the peers (``GLOO_SOCKET_IFNAME`` when the host name resolves
to a loopback address).

Timeouts: start-up (imports, JIT builds, compiles, checkpoint loads, the first steps) can take
many minutes on a busy cluster, so the group starts with ``launch.startup_timeout``. After
``launch.timeout_after_steps`` steps every group is switched to the shorter ``launch.timeout``, so
a rank that died or hangs fails the others within minutes instead of holding the allocation.
Checkpoint saves run under the long timeout again (rank 0 fsyncs while the others wait).

Progress: every rank writes its step and phase to the rendezvous store (two small writes per
step). When a collective fails or times out, the message names this rank and the ranks that were
behind it, read back from the store: gloo's own message names neither. On a GPU that holds for the
collectives that run over gloo (the per-step stop check among them); a timed-out NCCL collective
is ended by NCCL's watchdog instead, which aborts the process (docs/devices.md: what it prints).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from titans_train.jit_build import announce_pending_build

PROGRESS_KEY = "titans/progress/{rank}"


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
    alone = "WORLD_SIZE" not in env and "SLURM_NTASKS" not in env and "MASTER_PORT" not in env
    if alone:  # no launcher: any free port, so two lone runs on one host do not collide
        env["MASTER_PORT"] = str(free_port())
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_ds_accelerator(environ=os.environ) -> str:
    """``DS_ACCELERATOR`` when it is set; else set it to what DeepSpeed would auto-detect (cuda
    when torch sees a GPU, else cpu). Same choice, but DeepSpeed's detection logs a warning on
    stdout, ahead of ``titans-generate``'s text; setting it first keeps stdout for results.
    Called on import of titans_train, before anything imports DeepSpeed."""
    if not environ.get("DS_ACCELERATOR"):
        gpu = torch.cuda.device_count() > 0 and torch.cuda.is_available()
        environ["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"
    return environ["DS_ACCELERATOR"]


def accelerator():
    """DeepSpeed's accelerator: the one object that says which device this process trains on."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device_type() -> str:
    """'cuda', 'cpu' (or another DeepSpeed accelerator's name)."""
    return accelerator().device_name()


def process_group_backend(device_type: str, comm_backend: str) -> str:
    """The ``init_process_group`` backend: the accelerator's collective library for its tensors
    plus gloo for CPU tensors (module docstring: why both)."""
    if device_type == "cpu" or comm_backend == "gloo":
        return comm_backend
    return f"cpu:gloo,{device_type}:{comm_backend}"


def init_distributed(startup_timeout: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed on the accelerator's device and backend."""
    import deepspeed

    denv = env_from_launcher()
    announce_pending_build(denv.local_rank)  # DeepSpeed's silent C++ build on CPU
    # NCCL's watchdog ends a rank that timed out with SIGABRT, so no Python handler (and none of
    # failure_message) runs; faulthandler still prints every thread's Python stack on the way.
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(denv.local_rank)
    backend = process_group_backend(acc.device_name(), acc.communication_backend_name())
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=startup_timeout),
    )
    return denv


def set_timeout(seconds: float) -> bool:
    """Change the timeout of every process group, DeepSpeed's included (gloo and NCCL).

    ``_set_pg_timeout`` is private API (torch >= 2.3); without it the start-up timeout stays,
    which is safe, only slower to report a hang. Returns whether the change was applied.
    """
    if not dist.is_initialized():
        return False
    from torch.distributed import distributed_c10d as c10d

    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        return False
    timeout = datetime.timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):
        setter(timeout, group)
    return True


@contextmanager
def timeout_for(seconds: float, restore: float | None):
    """Run a block (a checkpoint save) under ``seconds``, then go back to ``restore``."""
    set_timeout(seconds)
    try:
        yield
    finally:
        if restore is not None:
            set_timeout(restore)


def _store():
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_default_store() if dist.is_initialized() else None


PHASES = ("loading data", "computing")  # in step order


def mark_progress(rank: int, step: int, phase: str) -> None:
    """Record that this rank is in ``step`` (1-based), ``phase``: one small store write."""
    store = _store()
    if store is not None:
        store.set(PROGRESS_KEY.format(rank=rank), f"{step} {PHASES.index(phase)}")


def ranks_behind(denv: DistEnv) -> list[str]:
    """'rank r in step s, phase' for every rank whose recorded progress is behind this rank's."""
    store = _store()
    if store is None:
        return []
    store.set_timeout(datetime.timedelta(seconds=10))
    seen = {}
    for r in range(denv.world_size):
        key = PROGRESS_KEY.format(rank=r)
        seen[r] = tuple(map(int, store.get(key).split())) if store.check([key]) else (0, -1)
    mine = seen[denv.rank]
    return [
        f"rank {r} in step {s} ({PHASES[p] if p >= 0 else 'not started'})"
        for r, (s, p) in seen.items()
        if (s, p) < mine
    ]


def failure_message(denv: DistEnv, step: int, error: BaseException) -> str:
    """Who failed, where, with what, and which ranks were behind it (likely the culprits)."""
    where = f"rank {denv.rank}/{denv.world_size} (host {socket.gethostname()}, pid {os.getpid()})"
    msg = f"{where} failed in step {step}: {type(error).__name__}: {error}"
    if dist.is_initialized():
        try:
            behind = ranks_behind(denv)
        except Exception as e:  # the store's host may be the one that died
            msg += f"\n  the rendezvous store did not answer ({type(e).__name__}: {e})"
        else:
            if behind:
                msg += "\n  ranks behind this one (stuck or dead?): " + ", ".join(behind)
    return msg


def set_tf32(enabled: bool) -> None:
    """``train.tf32``: fp32 matmuls (the memory's inner loop) in TF32 on CUDA (Ampere+).

    The legacy flag on purpose: once torch 2.13's ``fp32_precision`` API is used, its legacy
    getters (``torch.get_float32_matmul_precision``, which inductor reads) raise.
    """
    if device_type() == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled


def device() -> torch.device:
    """This process's training device, as DeepSpeed's accelerator places the model."""
    acc = accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.current_device_name())


def max_over_ranks(n: int) -> int:
    """The largest ``n`` of all ranks (one host-side collective: a CPU tensor, served by gloo
    in the CUDA group too); ``n`` itself without a process group."""
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
