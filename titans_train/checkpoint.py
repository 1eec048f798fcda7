"""Checkpoints that commit atomically and resume exactly (DESIGN "Checkpoints").

Layout: ``<run>/checkpoints/step_XXXXXXXX/`` holds DeepSpeed's engine files (model, optimizer,
scheduler), ``trainer_state.json`` (step, tokens, data position, every rank's RNG, W&B run id,
resolved config, git sha, world size) and, written last, ``COMPLETE``: the size of every file.
``<run>/checkpoints/latest`` names the newest committed checkpoint and is replaced atomically.

A checkpoint counts only if COMPLETE exists and every file it lists has its recorded size, so a
save cut short (preemption, a killed rank, a full disk) is skipped by auto-resume with a warning.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from titans_train.fsutil import fsync_path, write_text_atomically

STEP_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
STATE = "trainer_state.json"
# Changing these on resume changes what is trained on or what is trained: refused unless forced.
PROTECTED = ("model.", "data.", "train.seq_len", "train.seed")


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states (torch CPU/CUDA, numpy, python) as JSON-able strings."""
    buf = io.BytesIO()
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        buf,
    )
    return {"format": "torch.save+base64", "data": base64.b64encode(buf.getvalue()).decode()}


def set_rng_state(state: dict) -> None:
    s = torch.load(io.BytesIO(base64.b64decode(state["data"])), weights_only=False)
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


# -- save ----------------------------------------------------------------------------------------
def save(engine, root: Path, step: int, trainer_state: dict) -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint directory."""
    root = Path(root)
    path = step_dir(root, step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and path.exists():  # a leftover from a save that never committed
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
    rngs = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    _barrier()  # every rank's engine files are written
    if rank == 0:
        state = dict(trainer_state, rng=rngs, git_sha=git_sha(), version=1)
        write_text_atomically(path / STATE, json.dumps(state, indent=1))
        files = {}
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            fsync_path(f)
            files[str(f.relative_to(path))] = f.stat().st_size
        write_text_atomically(path / MARKER, json.dumps({"step": step, "files": files}, indent=1))
        write_text_atomically(root / "latest", path.name + "\n")
    _barrier()
    return path


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- find and verify -----------------------------------------------------------------------------
def incomplete_reason(path: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None if it is complete."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MARKER} marker ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"truncated file {name} ({f.stat().st_size} of {size} bytes)"
    try:
        json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {STATE} ({e})"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All step_* directories under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are named in a warning and skipped.

    ``latest`` is only a hint for people and tools: the scan decides, so a corrupt or stale
    ``latest`` never stops a resume.
    """
    root = Path(root)
    hint = root / "latest"
    if hint.exists():
        name = hint.read_text(errors="replace").strip()
        if not STEP_RE.match(name) or not (root / name).is_dir():
            warnings.warn(f"{hint}: ignoring unusable content {name[:40]!r}", stacklevel=2)
    for _, path in list_checkpoints(root):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=2)
    return None


def follow_latest(path: Path) -> Path:
    """A ``latest`` file -> the checkpoint directory it names; any other path as it is."""
    if path.name == "latest" and path.is_file():
        return path.parent / path.read_text().strip()
    return path


def resolve_resume(setting: str, root: Path) -> Path | None:
    """``auto`` -> newest complete checkpoint under root (or None); ``never`` -> None; or a path."""
    if setting == "never":
        return None
    if setting == "auto":
        return find_latest(root)
    path = follow_latest(Path(setting))
    reason = incomplete_reason(path) if path.is_dir() else "no such checkpoint directory"
    if reason:
        raise CheckpointError(f"cannot resume from {path}: {reason}")
    return path


def load_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


# -- config diff ---------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(protected changes, other changes) as 'key: old -> new' lines."""
    a, b = flatten(saved), flatten(current)
    protected, other = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            (protected if key.startswith(PROTECTED) else other).append(line)
    return protected, other


# -- retention -----------------------------------------------------------------------------------
def apply_retention(root: Path, keep_last: int, keep_every: int | None) -> list[Path]:
    """Delete old checkpoints: keep the newest ``keep_last`` complete ones and every step that is
    a multiple of ``keep_every``. The marker goes first, so a half-deleted one reads incomplete."""
    removed, kept_recent = [], 0
    for step, path in list_checkpoints(root):
        complete = incomplete_reason(path) is None
        if complete and kept_recent < keep_last:
            kept_recent += 1
            continue
        if keep_every and step % keep_every == 0 and complete:
            continue
        if not complete and kept_recent == 0:
            continue  # newer than any committed one: possibly a save in progress elsewhere
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
