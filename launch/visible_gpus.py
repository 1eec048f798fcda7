"""How many GPUs this node's training processes will use: launch/torchrun.sh's default
NPROC_PER_NODE. Prints one number on stdout.

The count is torch's own, ``torch.cuda.device_count()`` in the trainer's interpreter: it applies
``CUDA_VISIBLE_DEVICES`` (ordinals, ``GPU-``/``MIG-`` UUIDs, ``""`` for none) and MIG exactly as
the ranks will. When torch cannot use CUDA (a CPU build, a driver mismatch) but the node has GPUs
(``nvidia-smi -L``, or ``SLURM_GPUS_ON_NODE``), it stops with exit status 2 and says why, instead
of quietly training on CPU: set ``NPROC_PER_NODE`` to run on CPU anyway. Which of nvidia-smi's
GPUs count as visible then follows torch's rules for ``CUDA_VISIBLE_DEVICES`` (``visible``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_UUID = re.compile(r"\(UUID: ((?:GPU|MIG)-[^)\s]+)\)")


def parse_visible(value: str | None) -> list[int] | list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as torch reads it (torch.cuda._parse_visible_devices): None when
    unset (every device); a list of ordinals or of UUID prefixes. Parsing stops at the first
    invalid entry; a repeated entry makes the list empty."""
    if value is None:
        return None
    if value.startswith(("GPU-", "MIG-")):
        prefix, uuids = value[:4], []
        for elem in value.split(","):
            if elem in uuids:
                return []
            if not elem.startswith(prefix):
                break
            uuids.append(elem)
        return uuids
    ordinals: list[int] = []
    for elem in value.split(","):
        digits = re.match(r"[+-]?\d+", elem.strip())  # like strtoul: "1gpu" is 1
        ordinal = int(digits.group()) if digits else -1
        if ordinal in ordinals:
            return []
        if ordinal < 0:
            break
        ordinals.append(ordinal)
    return ordinals


def visible(value: str | None, uuids: list[str]) -> int:
    """How many of the node's devices (their UUIDs, nvidia-smi's order) ``value`` leaves."""
    parsed = parse_visible(value)
    if parsed is None:
        return len(uuids)
    count = 0
    for entry in parsed:
        if isinstance(entry, int):
            if entry >= len(uuids):
                break
        elif sum(u.startswith(entry) for u in uuids) != 1:  # unknown or ambiguous
            break
        count += 1
    return count


def nvidia_smi_uuids() -> list[str]:
    """UUIDs of the GPUs and MIG instances ``nvidia-smi -L`` lists (none without nvidia-smi).
    A GPU split into MIG instances counts as its instances."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus: list[list[str]] = []
    for line in out.stdout.splitlines():
        found = _UUID.search(line)
        if line.startswith("GPU "):
            gpus.append([found.group(1) if found else f"GPU-unknown-{len(gpus)}"])
        elif line.lstrip().startswith("MIG ") and gpus and found:
            gpus[-1] = [u for u in gpus[-1] if u.startswith("MIG-")] + [found.group(1)]
    return [uuid for gpu in gpus for uuid in gpu]


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print(torch.cuda.device_count())
        return 0
    uuids = nvidia_smi_uuids()
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = visible(cvd, uuids)
    slurm = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) if cvd != "" else 0
    if seen or slurm:
        where = f"nvidia-smi lists {len(uuids)}" if uuids else f"SLURM_GPUS_ON_NODE={slurm}"
        if cvd is not None and uuids:
            where += f", {seen} visible through CUDA_VISIBLE_DEVICES={cvd}"
        print(
            f"launch: this node has GPUs ({where}) but torch {torch.__version__} in "
            f"{sys.executable} cannot use them (a CPU build, or a driver too old for it). "
            "Install a CUDA build of torch (docs/gpus.md), or set NPROC_PER_NODE to run on CPU.",
            file=sys.stderr,
        )
        return 2
    print(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
