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

import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from titans_train import checkpoint as ckpt
from titans_train.config import Config, to_dict
from titans_train.distributed import DistEnv
from titans_train.preemption import ignore_stop_signals

UNIVERSAL = "universal"


@dataclass
class ResumePoint:
    path: Path | None = None
    state: dict | None = None
    universal: bool = False  # load through DeepSpeed's universal checkpoint
    messages: tuple[str, ...] = ()

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


def find_resume_point(cfg: Config, world_size: int) -> ResumePoint:
    """The checkpoint ``checkpoint.resume`` names, checked against this config; no engine yet."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.run_path / "checkpoints")
    messages = [f"warning: {w.message}" for w in caught]
    if path is None:
        return ResumePoint(messages=tuple(messages))
    state = ckpt.load_trainer_state(path)
    protected, other = ckpt.config_diff(state["config"], to_dict(cfg))
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
    return ResumePoint(path, state, universal, tuple(messages))


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
    if point.state["world_size"] == denv.world_size:
        ckpt.set_rng_state(point.state["rng"][denv.rank])


def save(cfg: Config, engine, loader, denv: DistEnv, step: int, tokens: int, run_id) -> Path:
    """Collective: commit a checkpoint of everything above; rank 0 applies retention."""
    root = cfg.run_path / "checkpoints"
    state = {
        "step": step,
        "tokens": tokens,
        "data": loader.state_dict(),
        "wandb_run_id": run_id,
        "config": to_dict(cfg),
        "world_size": denv.world_size,
        "skipped_steps": int(engine.skipped_steps),
    }
    path = ckpt.save(engine, root, step, state)
    if denv.is_main:
        for old in ckpt.apply_retention(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every):
            print(f"retention: removed {old}", file=sys.stderr)
    return path
