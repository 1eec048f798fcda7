"""One run at a time in a run directory: an exclusive lock on ``<run>/.lock``.

Two runs in one directory delete each other's checkpoints and interleave ``metrics.jsonl``, so
rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run>/.lock`` before anything is written
and holds it for the whole run; the other ranks learn the outcome by broadcast. The file also
records the holder (host, pid, SLURM job id, start time), for the message a refused run prints.

Release: a clean end, an error or a preemption exit marks the record released and unlocks; a
killed process loses its flock with its file descriptor (the kernel drops it), leaving an
unreleased record. The next run then takes over, with a message, when:
- the record is released, or names this host and a process that is no longer running;
- it names the same SLURM job (a requeue: SLURM starts the job again only after it ended).
An unreleased record from another host whose flock is gone is refused unless
``checkpoint.break_lock=true``: on Lustre mounted with ``localflock`` (or NFS without working lock
recovery) flock is not coherent across nodes, so a free flock does not prove the other host's run
has ended. A flock that is actually held is refused, except that ``break_lock`` overrides one held
from another host (an NFS server can keep a dead client's lock until its lease expires).
File systems without flock (Lustre without ``-o flock``) fall back to the record alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from titans_train.run_dir import LOCK, RunDir

LOCK_NAME = LOCK  # <run>/.lock (run_dir.py owns the layout)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockError(RuntimeError):
    """The run directory belongs to another run; the message names the holder."""


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "released": False,
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(h: dict) -> str:
    job = f", SLURM job {h['job']}" if h.get("job") else ""
    return f"host {h.get('host')} pid {h.get('pid')}{job} (since {h.get('started')})"


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        record = json.loads(raw.decode()) if raw.strip() else None
    except (UnicodeDecodeError, ValueError):
        return None  # garbage: nobody can be identified as the holder
    return record if isinstance(record, dict) else None


def _write(fd: int, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


@dataclass
class RunLock:
    path: Path
    fd: int | None
    record: dict
    notes: list[str] = field(default_factory=list)  # what the caller should print

    def release(self) -> None:
        """Mark the record released and unlock; safe to call twice."""
        if self.fd is None:
            return
        try:
            _write(self.fd, dict(self.record, released=True))
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the descriptor below drops the flock anyway
        finally:
            os.close(self.fd)
            self.fd = None


def _refuse(path: Path, holder: dict | None, why: str, hint: str) -> RunLockError:
    who = _describe(holder) if holder else "an unidentified process"
    return RunLockError(f"run directory {path.parent} is locked by {who} ({path}): {why}. {hint}")


def _take_over(path: Path, prev: dict | None, locked: bool, break_lock: bool) -> str | None:
    """None or a note when the record allows this run to proceed; RunLockError otherwise."""
    me = _me()
    if not prev or prev.get("released"):
        return None
    same_host = prev.get("host") == me["host"]
    if same_host and prev.get("pid") == me["pid"]:
        return None
    if same_host and not (_alive(int(prev.get("pid") or 0)) and not locked):
        return f"taking over the lock of {_describe(prev)}: that process is no longer running"
    if same_host:
        raise _refuse(path, prev, "that process is still running", "Use another run_dir.")
    if prev.get("job") and prev.get("job") == me["job"]:
        return f"taking over the lock of {_describe(prev)}: an earlier attempt of this job"
    if break_lock:
        return f"checkpoint.break_lock: taking over the lock of {_describe(prev)}"
    raise _refuse(
        path,
        prev,
        f"it was not released, and host {me['host']} cannot tell whether that run still lives",
        "If it has ended (check the host), pass checkpoint.break_lock=true; otherwise use another "
        "run_dir.",
    )


def acquire(run_dir: str | Path, break_lock: bool = False) -> RunLock:
    """Take the run directory's lock or raise RunLockError naming the holder."""
    path = RunDir(run_dir).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # the umask applies (checkpoint.private)
    notes = []
    try:
        broken = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _read(fd)
            foreign = holder is not None and holder.get("host") != socket.gethostname()
            if not (break_lock and foreign):
                hint = "Wait for it to end, or use another run_dir."
                if foreign:
                    hint += " If its host is gone, pass checkpoint.break_lock=true."
                raise _refuse(path, holder, "another run is using it", hint) from None
            locked, broken = False, True
            notes.append(f"checkpoint.break_lock: ignoring the lock held by {_describe(holder)}")
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            locked = False
            notes.append(
                f"{path}: the file system has no flock ({e.strerror}); relying on the record"
            )
        note = None if broken else _take_over(path, _read(fd), locked, break_lock)
        if note:
            notes.append(note)
        record = _me()
        _write(fd, record)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd, record, notes)


def take_run_lock(
    run_dir: str | Path, is_main: bool, break_lock: bool = False, private: bool = False
) -> RunLock | None:
    """Collective: rank 0 takes the lock (and with ``private`` makes the run directory 0700);
    every rank raises the same RunLockError if it could not. Other ranks return None."""
    import torch.distributed as dist

    lock, error = None, None
    if is_main:
        try:
            lock = acquire(run_dir, break_lock)
            if private:
                os.chmod(run_dir, 0o700)  # also when it existed before, under a looser umask
        except (RunLockError, OSError) as e:
            error = f"{e}"
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise RunLockError(error)
    return lock
