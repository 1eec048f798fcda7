"""Preemption: a signal or the end of the allocation stops the run at a step boundary, with a
checkpoint, and asks to be requeued.

- SIGUSR1 (SLURM's early warning: ``#SBATCH --signal=B:USR1@<s>``, forwarded to the training
  processes by launch/slurm.sbatch) and SIGTERM (what SLURM sends at the time limit, on
  preemption or on ``scancel``, KillWait seconds before SIGKILL) only set a flag. The handler
  runs between bytecodes of the main thread and does nothing else, so it interrupts nothing.
- A wall-time guard on rank 0 reads the allocation's end from SLURM (``squeue -o %e``, re-read
  every ``walltime_poll`` s because ``scontrol update`` can move it) and raises its own flag
  ``walltime_margin`` s before the end: the second line of defence when no signal comes.
- At every step boundary all ranks contribute their flags to one MAX all-reduce, so they all stop
  at the same step, save the same checkpoint and leave together.

How the process exits after such a stop (see ``exit_for_requeue``): with REQUEUE_EXIT, except
under launch/torchrun.sh, which sets TITANS_EXIT_FILE. torchrun restarts a worker group on any
non-zero exit (``--max-restarts``) and reports every failure as 1, so there a stopped worker
writes the reason to that file and exits 0, and the launcher turns the file into REQUEUE_EXIT.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Distinctive: not a shell code (126/127/128+n), not sysexits (64-78), not Python's 1/2.
REQUEUE_EXIT = 85
EXIT_FILE_ENV = "TITANS_EXIT_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REASONS = ("SIGUSR1", "SIGTERM", "wall-time guard")


@dataclass
class WalltimeGuard:
    """Rank 0's view of when the SLURM allocation ends."""

    job_id: str | None
    margin: float
    poll: float
    end: float | None = None
    _read_at: float = -1e18
    _warned: bool = False

    def seconds_left(self, now: float) -> float | None:
        if not self.job_id or self.margin <= 0:
            return None
        if now - self._read_at >= self.poll:
            self._read_at = now
            end = allocation_end(self.job_id)
            if end is not None:
                self.end = end
            elif not self._warned:
                self._warned = True
                print(f"wall-time guard: no end time for job {self.job_id}", file=sys.stderr)
        return None if self.end is None else self.end - now

    def due(self, now: float) -> bool:
        left = self.seconds_left(now)
        return left is not None and left < self.margin


def thin_margin_warning(save_seconds: float, margin: float) -> str | None:
    """A warning when a checkpoint save takes more than half of ``launch.walltime_margin``: the
    guard's stop must save and requeue before SLURM's limit, and saves slow down under load."""
    if margin <= 0 or 2 * save_seconds <= margin:
        return None
    return (
        f"warning: this checkpoint save took {save_seconds:.0f} s, more than half of "
        f"launch.walltime_margin={margin:.0f} s; a wall-time stop may not finish its checkpoint "
        f"and requeue before the time limit. Raise launch.walltime_margin (e.g. to "
        f"{max(2 * margin, 3 * save_seconds):.0f})."
    )


def allocation_end(job_id: str) -> float | None:
    """Unix time at which SLURM ends the job, or None (no time limit, or squeue failed).

    squeue prints the end in the local time zone, which ``datetime`` assumes for a naive value.
    USR1/TERM are ignored in the child: a signal to the whole process tree must not kill it.
    """
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%e"],
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=ignore_stop_signals,
        ).stdout.strip()
        return datetime.datetime.fromisoformat(out).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """Install with ``Preemption(...)`` as early as possible; ask ``should_stop()`` every step."""

    def __init__(self, rank: int, walltime_margin: float = 0.0, walltime_poll: float = 60.0):
        self.rank = rank
        self.received: dict[int, float] = {}  # signal -> time it first arrived
        self.guard = WalltimeGuard(
            os.environ.get("SLURM_JOB_ID") if rank == 0 else None, walltime_margin, walltime_poll
        )
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received.setdefault(signum, time.time())

    def local_flags(self) -> torch.Tensor:
        # A CPU tensor: host-side flags; on a GPU the group serves CPU over gloo (distributed.py).
        return torch.tensor(
            [
                signal.SIGUSR1 in self.received,
                signal.SIGTERM in self.received,
                self.guard.due(time.time()),
            ],
            dtype=torch.int32,
        )

    def should_stop(self) -> str | None:
        """Collective: the reason every rank agrees to stop for, or None to go on."""
        flags = self.local_flags()
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        reasons = [name for name, on in zip(REASONS, flags.tolist()) if on]
        if not reasons:
            return None
        if "wall-time guard" in reasons and self.guard.end is not None:
            left = self.guard.end - time.time()
            reasons[reasons.index("wall-time guard")] += f" ({left:.0f} s left in the allocation)"
        return ", ".join(reasons)

    def seconds_left(self) -> float | None:
        return self.guard.seconds_left(time.time())


def exit_for_requeue(reason: str, step: int, local_rank: int) -> None:
    """Leave after a stop whose checkpoint is committed (module docstring: why two ways)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path:
        sys.exit(REQUEUE_EXIT)
    if local_rank == 0:
        with open(path, "w") as f:
            f.write(f"requeue step={step} reason={reason}\n")
    sys.exit(0)
