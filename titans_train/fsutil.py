"""Crash-safe file writes: write a temporary name, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import BinaryIO


def fsync_path(path: str) -> None:
    """fsync a directory, or a file another writer (e.g. DeepSpeed's torch.save) left unsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """Hidden, so a glob for shards never picks up a half-written one."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp")


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temp file and rename it to `path` only once it is on disk."""
    tmp = temp_name(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def write_text_atomically(path: str, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomically(path: str, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))
