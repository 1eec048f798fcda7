"""Where DeepSpeed's JIT-built C++ ops live, and which ninja builds them (docs/gpus.md#jit-builds).

On CPU, DeepSpeed compiles its ``deepspeed_shm_comm`` op at every cold start (about a minute).
torch caches such builds in ``~/.cache/torch_extensions``, shared by every environment, so two
environments used in turn (a CPU and a CUDA one, CI next to a run, ``make`` next to an activated
venv with another ninja) rebuild over each other. ``apply_defaults`` runs when ``titans_train``
is imported, before DeepSpeed can build anything, so every entry point (``make``, the launchers,
an activated venv, ``.venv/bin/python`` alone) agrees:

- ``TORCH_EXTENSIONS_DIR`` defaults to ``<venv>/torch_extensions`` (in a writable virtualenv), else
  to ``~/.cache/torch_extensions/<python>-<hash of sys.prefix>``: one cache per environment. A value
  set by the user is kept.
- The environment's own ``bin/`` goes first on ``PATH`` when it holds ``ninja`` (DeepSpeed depends
  on it): one ninja per environment, found even when the venv is not activated.

This module must not import torch or DeepSpeed at import time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"


def default_extensions_dir() -> str:
    """One torch-extensions cache per Python environment."""
    prefix = Path(sys.prefix)
    if _is_environment() and os.access(prefix, os.W_OK):
        return str(prefix / "torch_extensions")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha1(str(prefix.resolve()).encode()).hexdigest()[:10]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return str(cache / "torch_extensions" / f"{tag}-{key}")


def _is_environment() -> bool:
    """A virtualenv or a conda environment (not the system's Python, whose bin/ is shared)."""
    return sys.prefix != sys.base_prefix or (Path(sys.prefix) / "conda-meta").is_dir()


def apply_defaults(environ=os.environ) -> None:
    """Set TORCH_EXTENSIONS_DIR (unless set) and put this environment's ninja first on PATH."""
    if not environ.get("TORCH_EXTENSIONS_DIR"):
        environ["TORCH_EXTENSIONS_DIR"] = default_extensions_dir()
    bindir = Path(sys.prefix) / "bin"
    if _is_environment() and (bindir / "ninja").is_file():
        parts = environ.get("PATH", "").split(os.pathsep)
        if not parts or parts[0] != str(bindir):
            environ["PATH"] = os.pathsep.join([str(bindir), *[p for p in parts if p]])


def pending_build_notice(op: str = SHM_OP) -> str | None:
    """A line to print before DeepSpeed JIT-builds ``op`` (the CPU accelerator's shared-memory
    communication op), or None when it is prebuilt, cached or not needed here."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    if get_accelerator().device_name() != "cpu" or installed_ops.get(op, False):
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        return None
    build = Path(root) / op
    if any(build.glob(f"{op}*.so")):
        return None
    return (
        f"DeepSpeed is compiling its C++ op {op} into {build} (once per environment; about "
        "1 minute, several on a busy machine; needs a C++ compiler and ninja)"
    )


def announce_pending_build(local_rank: int) -> None:
    """Say so on stderr (one process per node) before a silent minute of compiling."""
    if local_rank == 0:
        notice = pending_build_notice()
        if notice:
            print(notice, file=sys.stderr, flush=True)
