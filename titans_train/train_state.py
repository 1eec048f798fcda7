"""What the trainer saves and restores around checkpoint.py's commit protocol: which checkpoint to
resume from (decided before the engine exists), DeepSpeed's universal conversion when the world
size changed, restoring engine, data position and RNG, and saving all of it.

Other world sizes: a ZeRO >= 1 checkpoint holds one optimizer partition per rank. When the saved
world size differs, rank 0 converts the checkpoint once with DeepSpeed's ``ds_to_universal``
into ``step_XXXXXXXX/universal/`` (written to a temporary name, then renamed), and the engine is
built with ``checkpoint.load_universal`` to load it. The data position is a global sample count
(docs/data.md), so the loader neither repeats nor skips; RNG states are per rank and are not
restored. DeepSpeed #6691 reports converted runs that train as if from scratch:
tests/test_launch_torchrun.py checks that the loss continues the uninterrupted curve.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from titans_train import checkpoint as ckpt
from titans_train import rng_state as rng_codec
from titans_train.config import Config, public_dict, resolve_mix, upgrade_stored
from titans_train.distributed import DistEnv, device
from titans_train.preemption import ignore_stop_signals
from titans_train.run_dir import RunDir

UNIVERSAL = "universal"
# The exit status of a run stopped by a full disk: EX_IOERR, never preemption.REQUEUE_EXIT, so
# no batch script requeues a job that would only fill the disk again.
DISK_FULL_EXIT = 74
_SHORT_WRITE = ("No space left", "unexpected pos", "file write failed")  # torch's C++ writer


class DiskFullError(ckpt.CheckpointError):
    """A checkpoint save ran out of space; the message names the step and the directory."""


@dataclass
class ResumePoint:
    path: Path | None = None
    state: dict | None = None
    universal: bool = False  # load through DeepSpeed's universal checkpoint
    messages: tuple[str, ...] = ()
    restore_rng: bool = True  # False: same world size, but the RNG states were refused (forced)

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


def find_resume_point(cfg: Config, denv: DistEnv) -> ResumePoint:
    """The checkpoint ``checkpoint.resume`` names, checked against this config; no engine yet.

    Collective: rank 0 decides (it reads, and hashes, the checkpoint files once) and tells the
    other ranks, so every rank resumes from the same checkpoint or fails with the same error.
    """
    result: ResumePoint | ckpt.CheckpointError | None = None
    if denv.is_main:
        try:
            result = _decide(cfg, denv.world_size)
        except ckpt.CheckpointError as e:
            result = e
    if dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, Exception):
        raise result
    return result


def _decide(cfg: Config, world_size: int) -> ResumePoint:
    root = RunDir(cfg.run_path).checkpoints
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ckpt.resolve_resume(cfg.checkpoint.resume, root)
    messages = [f"warning: {w.message}" for w in caught]
    if path is None:
        if cfg.checkpoint.resume == "never" and (aside := ckpt.set_aside(root)):
            messages.append(f"checkpoint.resume=never: earlier checkpoints moved to {aside}")
        return ResumePoint(messages=tuple(messages))
    state = ckpt.load_trainer_state(path)
    protected, other = config_changes(cfg, state["config"])
    if protected and not cfg.checkpoint.force:
        raise ckpt.CheckpointError(
            f"run {cfg.name!r} ({cfg.run_path}) already holds a checkpoint of a different model "
            f"or data config ({path.name}). Changed:\n  " + "\n  ".join(protected) + "\n"
            "For a new experiment give it its own run: name=<new-name>. To start this run over: "
            "checkpoint.resume=never. Only for a deliberate change to this run in progress: "
            "checkpoint.force=true."
        )
    messages += [f"config changed since the checkpoint: {line}" for line in protected + other]
    universal = state["world_size"] != world_size and cfg.zero.stage > 0
    if universal:
        messages.append(
            f"{path} was saved by {state['world_size']} ranks and this run has {world_size}: "
            f"loading ZeRO-{cfg.zero.stage} state through DeepSpeed's universal checkpoint"
        )
    point = ResumePoint(path, state, universal, tuple(messages))
    if state["world_size"] == world_size:
        _check_rng(point, cfg.checkpoint.force)
    return point


def config_changes(cfg: Config, stored: dict) -> tuple[list[str], list[str]]:
    """(protected, other) changes from a checkpoint's stored config to ``cfg``, as lines.

    The stored config is redacted (config.public_dict): compare like with like. One saved by an
    earlier version has its execution keys (model.attn_backend, ...) where runtime.* is now, and
    no data.document_masking (it trained without) nor data.mix (it read shuffled). data.mix=auto
    takes the checkpoint's, as Trainer.setup does: only an explicit other mix is a change.
    """
    current = public_dict(cfg)
    current["data"]["mix"] = resolve_mix(cfg.data.mix, stored)
    return ckpt.config_diff(upgrade_stored(stored), current)


def _check_rng(point: ResumePoint, force: bool) -> None:
    """Refuse RNG states that are not plain data before anything else is loaded."""
    where = point.path / ckpt.STATE
    try:
        states = point.state.get("rng")
        if not isinstance(states, list) or len(states) != point.state["world_size"]:
            raise ckpt.CheckpointError(f"{where}: rng: expected one state per rank")
        for rank, state in enumerate(states):
            try:
                rng_codec.decode(state)
            except rng_codec.RngStateError as e:
                raise ckpt.CheckpointError(f"{where}: rng[{rank}]: {e}") from e
    except ckpt.CheckpointError as e:
        if not force:
            raise ckpt.CheckpointError(
                f"{e}. Nothing from it was run. Pass checkpoint.force=true to resume without "
                "restoring RNG states (the data order is unaffected), or checkpoint.resume=never"
            ) from e
        point.restore_rng = False
        point.messages += (f"warning: {e}; checkpoint.force: RNG states not restored",)


def check_finite(engine, step: int) -> None:
    """Collective: stop before committing non-finite parameters (one reduction per rank).

    Under ZeRO-3 a parameter's data is empty outside forward/backward and ``ds_tensor`` is this
    rank's partition: each rank checks what it holds and an all-reduce agrees. The flag lives on
    the trainer's device, since NCCL refuses CPU tensors.
    """
    named = [
        (n, p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p.data)
        for n, p in engine.module.named_parameters()
    ]
    flags = torch.stack([~torch.isfinite(t).all() for _, t in named if t.numel()])
    bad = flags.sum().to(device=device(), dtype=torch.float32)
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad.item() > 0:
        local = [n for n, t in named if t.numel() and not torch.isfinite(t).all()]
        where = f" (e.g. {', '.join(local[:3])})" if local else ""
        raise ckpt.CheckpointError(
            f"step {step}: parameters are not finite{where}; refusing to commit a checkpoint of "
            "them. The checkpoints already committed are kept; check the optim settings (lr, eps, "
            "weight_decay) and the data, then resume from the last one"
        )


def to_universal(path: Path) -> Path:
    """``path/universal``: DeepSpeed's universal checkpoint of ``path``, converted once.

    Run by one rank. The conversion runs in a child process (DeepSpeed's own CLI, which forks
    workers) with USR1/TERM ignored, so a preemption signal cannot cut it short; the rename
    makes a half-written conversion invisible.
    """
    out = path / UNIVERSAL
    if out.is_dir():
        return out
    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    cmd += ["--input_folder", str(path), "--output_folder", str(tmp)]
    cmd += ["--num_extract_workers", workers, "--num_merge_workers", workers]
    # Checkpoints from before the model declared universal_checkpoint_info lack DeepSpeed's
    # version record; the converter adds it.
    cmd += ["--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=ignore_stop_signals)
    if proc.returncode != 0:
        raise ckpt.CheckpointError(
            f"converting {path} to a universal checkpoint failed:\n{proc.stderr[-3000:]}"
        )
    tmp.rename(out)
    return out


def prepare(point: ResumePoint, denv: DistEnv) -> None:
    """Collective: rank 0 converts to a universal checkpoint when needed; the others wait."""
    if not point.universal:
        return
    error = None
    if denv.is_main:
        try:
            to_universal(point.path)
        except ckpt.CheckpointError as e:
            error = e
    if dist.is_initialized():
        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0)
        if failed[0] and error is None:
            raise ckpt.CheckpointError("rank 0 could not convert the checkpoint (see its log)")
    if error is not None:
        raise error


def restore(point: ResumePoint, engine, loader, denv: DistEnv) -> None:
    """Load engine state, data position and (same world size only) this rank's RNG."""
    path = point.path
    load_dir, tag = (path, UNIVERSAL) if point.universal else (path.parent, path.name)
    try:
        loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    except Exception as e:  # DeepSpeed raises many kinds; name the checkpoint in all of them
        raise ckpt.CheckpointError(f"loading {path} failed: {type(e).__name__}: {e}") from e
    if loaded is None:
        raise ckpt.CheckpointError(f"DeepSpeed found nothing to load in {path}")
    loader.load_state_dict(point.state["data"])
    if point.state["world_size"] == denv.world_size and point.restore_rng:
        ckpt.set_rng_state(point.state["rng"][denv.rank], f"{path / ckpt.STATE}: rng[{denv.rank}]")


def save(
    cfg: Config, engine, loader, denv: DistEnv, step: int, tokens: int, extra: dict | None = None
) -> Path:
    """Collective: commit a checkpoint of everything above; rank 0 applies retention. ``extra``
    holds the callbacks' state (e.g. ``wandb_run_id``), stored at the top level."""
    root = RunDir(cfg.run_path).checkpoints
    check_finite(engine, step)
    state = {
        "step": step,
        "tokens": tokens,
        "data": loader.state_dict(),
        "wandb_run_id": None,
        "config": public_dict(cfg),  # redacted: a checkpoint is often copied and shared
        "world_size": denv.world_size,
        "skipped_steps": int(engine.skipped_steps),
        **(extra or {}),
    }
    try:
        path = ckpt.save(engine, root, step, state, checksum=cfg.checkpoint.checksum)
    except Exception as e:
        if not disk_full(e, root):
            raise
        raise _disk_full_error(e, ckpt.step_dir(root, step), step) from e
    if denv.is_main:
        for old in ckpt.apply_retention(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every):
            print(f"retention: removed {old}", file=sys.stderr)
    return path


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether a failed save ran out of space. torch's C++ writer reports a short write as
    ``unexpected pos`` without an errno, so that case also needs the disk to be (nearly) full."""
    e: BaseException | None = error
    for _ in range(16):  # the exception chain: what torch or DeepSpeed raised, and its causes
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in _SHORT_WRITE):
            try:
                return shutil.disk_usage(where).free < 64 << 20
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


def _disk_full_error(error: BaseException, path: Path, step: int) -> DiskFullError:
    """Remove the partial (uncommitted) step directory and say so, in one line."""
    removed = ""
    if path.is_dir() and not (path / ckpt.MARKER).exists():
        shutil.rmtree(path, ignore_errors=True)
        removed = f"; removed the partial {path.name}"
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free now"
    except OSError:
        free = "free space unknown"
    cause = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return DiskFullError(
        f"disk full (ENOSPC) saving the step-{step} checkpoint to {path} ({cause}){removed}; "
        f"{free}. Free space or lower checkpoint.keep_last, then resume from the newest "
        "complete checkpoint (this is not requeued)"
    )
