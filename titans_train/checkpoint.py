"""Checkpoints that commit atomically and resume exactly (DESIGN "Checkpoints").

Layout: ``<run>/checkpoints/step_XXXXXXXX/`` holds DeepSpeed's engine files (model, optimizer,
scheduler), ``trainer_state.json`` (step, tokens, data position, every rank's RNG, W&B run id,
resolved config, git sha, world size) and, written last, ``COMPLETE``: the size and checksum of
every file.
``<run>/checkpoints/latest`` names the newest committed checkpoint and is replaced atomically.

A checkpoint counts only if COMPLETE exists and every file it lists has its recorded size and
checksum, so a save cut short (preemption, a killed rank, a full disk) or a file damaged later is
skipped by auto-resume with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from titans_train import rng_state as rng_codec
from titans_train.fsutil import fsync_path, write_text_atomically
from titans_train.run_dir import CHECKPOINTS, LATEST, STEP_RE, step_name

MARKER = "COMPLETE"
STATE = "trainer_state.json"
# Changing these on resume changes what is trained on or what is trained: refused unless forced.
# Not runtime.* (how it runs) nor data.num_workers (workers only read shards; the order is the
# plan's, docs/data.md).
PROTECTED = ("model.", "data.", "train.seq_len", "train.seed")
UNPROTECTED = ("data.num_workers",)


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / step_name(step)


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
    """This process's RNG states as plain JSON (rng_state.py): nothing in it is ever unpickled."""
    return rng_codec.capture()


def set_rng_state(state: dict, where: str = "trainer_state.json") -> None:
    """Restore a stored RNG state; CheckpointError naming ``where`` if it is unsafe or invalid."""
    try:
        rng_codec.restore(rng_codec.decode(state))
    except rng_codec.RngStateError as e:
        raise CheckpointError(f"{where}: RNG state cannot be restored: {e}") from e


# -- checksums -----------------------------------------------------------------------------------
CHECKSUMS = ("auto", "xxh3", "blake2b", "none")


def resolve_checksum(setting: str) -> str:
    """``auto`` -> xxh3 when the xxhash package imports (wandb depends on it), else blake2b:
    xxh3 adds about a tenth to a save, blake2b doubles it (docs/benchmarks.md)."""
    if setting != "auto":
        return setting
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "blake2b"
    return "xxh3"


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 4 MiB blocks."""
    if algorithm == "xxh3":
        import xxhash  # optional: checkpoint.checksum=xxh3 needs it installed

        h = xxhash.xxh3_128()
    elif algorithm == "blake2b":
        h = hashlib.blake2b(digest_size=32)
    else:
        raise CheckpointError(f"unknown checksum {algorithm!r} (one of {', '.join(CHECKSUMS)})")
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# -- save ----------------------------------------------------------------------------------------
def save(engine, root: Path, step: int, trainer_state: dict, checksum: str = "auto") -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint directory.

    ``checksum`` (auto, xxh3, blake2b or none) is recorded in COMPLETE for every file, so damage
    that keeps a file's size is caught on resume.
    """
    checksum = resolve_checksum(checksum)
    root = Path(root)
    path = step_dir(root, step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # A leftover of this run directory's own lineage (a save that never committed, or one that
    # failed its checksum and was skipped by the resume): the lock and the resume rules make
    # every step directory here this run's (docs/checkpoints.md).
    if rank == 0 and path.exists():
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
        state = dict(trainer_state, rng=rngs, git_sha=git_sha(), version=2)
        write_text_atomically(path / STATE, json.dumps(state, indent=1))
        files, digests = {}, {}
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            fsync_path(f)
            name = str(f.relative_to(path))
            files[name] = f.stat().st_size
            if checksum != "none":
                digests[name] = file_digest(f, checksum)
        marker = {"step": step, "files": files}
        if digests:
            marker.update(checksum=checksum, digests=digests)
        write_text_atomically(path / MARKER, json.dumps(marker, indent=1))
        write_text_atomically(root / LATEST, path.name + "\n")
    _barrier()
    return path


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- find and verify -----------------------------------------------------------------------------
def incomplete_reason(path: Path, checksums: bool = True) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None if it is complete.

    With ``checksums`` every file recorded with a digest is read and hashed again (a mismatch
    names the file); checkpoints from before checksums are checked by size only.
    """
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (the save did not finish)"
    try:
        record = json.loads(marker.read_text())
        files, digests = record["files"], record.get("digests") or {}
        algorithm = record.get("checksum", "none")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"truncated file {name} ({f.stat().st_size} of {size} bytes)"
    if checksums:
        for name, digest in digests.items():
            try:
                actual = file_digest(path / name, algorithm)
            except (OSError, ImportError, CheckpointError) as e:
                return f"cannot verify {name} ({type(e).__name__}: {e})"
            if actual != digest:
                return (
                    f"checksum mismatch in file {name} ({algorithm}: the file changed after commit)"
                )
    try:
        json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {STATE} ({e})"
    return None


def has_checksums(path: Path) -> bool:
    try:
        return bool(json.loads((Path(path) / MARKER).read_text()).get("digests"))
    except (OSError, ValueError, AttributeError):
        return False


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All step_* directories under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def find_latest(root: Path, checksums: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete ones are named in a warning and skipped.

    ``latest`` is only a hint for people and tools: the scan decides, so a corrupt or stale
    ``latest`` never stops a resume.
    """
    root = Path(root)
    hint = root / LATEST
    if hint.exists():
        name = hint.read_text(errors="replace").strip()
        if not STEP_RE.match(name) or not (root / name).is_dir():
            warnings.warn(f"{hint}: ignoring unusable content {name[:40]!r}", stacklevel=2)
    for _, path in list_checkpoints(root):
        reason = incomplete_reason(path, checksums=checksums)
        if reason is None:
            if checksums and not has_checksums(path):
                warnings.warn(
                    f"{path}: no checksums recorded (saved before they were): sizes checked only",
                    stacklevel=2,
                )
            return path
        warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=2)
    return None


def follow_latest(path: Path) -> Path:
    """A ``latest`` file -> the checkpoint directory it names, beside it; any other path as it
    is. Its content is untrusted: anything but a ``step_XXXXXXXX`` name is refused, so a
    ``latest`` of ``../../elsewhere`` cannot lead outside the checkpoints folder."""
    if path.name != LATEST or not path.is_file():
        return path
    name = path.read_text(errors="replace").strip()
    if not STEP_RE.match(name):
        raise CheckpointError(f"{path}: names {name[:40]!r}, not a step_XXXXXXXX directory")
    return path.parent / name


def resolve_checkpoint(spec: str | Path, run: str | Path | None = None) -> Path:
    """The one resolver: a complete ``step_XXXXXXXX`` directory from that directory, a ``latest``
    file, a run directory or its ``checkpoints/`` (the newest complete one), or the word
    ``latest`` with ``run``. Errors name the path and what is wrong with it."""
    if str(spec) == LATEST:
        if run is None:
            raise CheckpointError("--checkpoint latest needs --run RUN_DIR (e.g. runs/tiny-mac)")
        spec = run
    path = follow_latest(Path(spec))
    is_step = STEP_RE.match(path.name) or (path / STATE).exists()
    if path.is_dir() and not is_step:
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        found = find_latest(root)
        if found is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        path = found
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {path}")
    reason = incomplete_reason(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} is unusable: {reason}")
    return path


def resolve_resume(setting: str, root: Path) -> Path | None:
    """``auto`` -> newest complete checkpoint under root (None when there is no step directory
    at all); ``never`` -> None; or whatever ``resolve_checkpoint`` accepts. ``auto`` refuses
    when step directories exist but none is complete: starting over there would silently lose
    the run."""
    if setting == "never":
        return None
    if setting != "auto":
        return resolve_checkpoint(setting)
    found = find_latest(root)
    existing = list_checkpoints(root)
    if found is None and existing:
        newest = existing[0][1]
        raise CheckpointError(
            f"{root} holds {len(existing)} step directories but none is complete (newest "
            f"{newest.name}: {incomplete_reason(newest)}). Refusing to "
            "start over silently. Pass checkpoint.resume=never to start over (the old step "
            "directories are moved aside, not deleted), or checkpoint.resume=PATH to name a "
            "checkpoint"
        )
    return found


def set_aside(root: Path) -> Path | None:
    """Move every step directory and ``latest`` of ``root`` into ``root/previous-<UTC time>/``
    (a fresh start in a run directory that has checkpoints: nothing is deleted, and no old
    checkpoint can later be mistaken for one of the new run's). Returns the new folder."""
    root = Path(root)
    old = [p for _, p in list_checkpoints(root)]
    hint = root / LATEST
    if not old and not hint.exists():
        return None
    aside = root / time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for p in [*old, *([hint] if hint.exists() else [])]:
        p.rename(aside / p.name)
    fsync_path(str(root))
    return aside


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
            guarded = key.startswith(PROTECTED) and not key.startswith(UNPROTECTED)
            (protected if guarded else other).append(line)
    return protected, other


# -- retention -----------------------------------------------------------------------------------
def apply_retention(root: Path, keep_last: int, keep_every: int | None) -> list[Path]:
    """Delete old checkpoints: keep the newest ``keep_last`` complete ones and every step that is
    a multiple of ``keep_every``. The marker goes first, so a half-deleted one reads incomplete."""
    removed, kept_recent = [], 0
    for step, path in list_checkpoints(root):
        complete = incomplete_reason(path, checksums=False) is None  # hashing here: every save
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
