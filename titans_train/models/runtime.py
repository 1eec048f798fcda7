"""How a model runs, apart from what it computes (DESIGN 15: execution is not maths).

``RuntimeConfig`` holds the switches that change speed and memory but not the function: the
attention backend, the memory backend, the memory's checkpoint groups and per-block activation
checkpointing. Every backend equals ``eager``/``sdpa`` within tolerance, so these may change on
resume, and they are not part of an exported model.

``apply_activation_checkpointing`` adds recompute-in-backward to a built model from outside, as
torchtitan's ``apply_ac`` does; the model itself knows nothing of it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .kernels import (
    kernel_fits_registers,
    kernel_shape_problem,
    triton_device_problem,
    triton_importable,
)

ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash")
MEMORY_BACKENDS = ("auto", "eager", "compile", "triton")
CPU_THREADS = ("auto", "caller")
# ModelConfig keys of earlier versions that are execution settings (read with a warning).
LEGACY_MODEL_KEYS = ("attn_backend", "memory_backend", "memory_compile", "memory_checkpoint_group")


@dataclass
class RuntimeConfig:
    attn_backend: str = "auto"  # auto | sdpa | flex | flash (docs/attention.md)
    # auto | eager | compile | triton (docs/memory.md "Speed and memory options").
    memory_backend: str = "auto"
    # Chunks per activation-checkpoint group inside the memory (0 = off): keeps M and S only at
    # group boundaries and recomputes the rest in backward (4x less peak memory at 4K tokens for
    # one more forward of the inner loop). See docs/memory.md.
    memory_checkpoint_group: int = 16
    activation_checkpointing: bool = False  # recompute each block in backward
    # TitansLM checkpoints the memories' chunk loops only when the chunk states a forward would
    # otherwise keep (M and S per chunk, every memory layer, estimated from batch and length)
    # exceed this many MiB; below it it keeps them and saves the recompute. 0: always checkpoint.
    memory_checkpoint_budget_mb: float = 256.0
    # auto: on CPU a small model, and a small memory chunk loop, run on one intra-op thread,
    # where a second one costs more in forks and joins than it gains (models/threads.py);
    # caller: torch's thread setting as the caller left it. Results are equal either way.
    cpu_threads: str = "auto"  # (last: fields are positional)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"runtime.{key}={getattr(self, key)!r}: {why}")

        if self.attn_backend not in ATTN_BACKENDS:
            bad("attn_backend", f"must be one of {', '.join(ATTN_BACKENDS)}")
        if self.memory_backend not in MEMORY_BACKENDS:
            bad("memory_backend", f"must be one of {', '.join(MEMORY_BACKENDS)}")
        if self.memory_backend == "triton" and not triton_importable():
            bad("memory_backend", "triton is not installed (pip install triton); or use auto")
        if self.cpu_threads not in CPU_THREADS:
            bad("cpu_threads", f"must be one of {', '.join(CPU_THREADS)}")
        if self.memory_checkpoint_group < 0:
            bad("memory_checkpoint_group", "must be >= 0 (0 = off)")
        if not self.memory_checkpoint_budget_mb >= 0:
            bad("memory_checkpoint_budget_mb", "must be >= 0 (0 = always checkpoint)")


def legacy_runtime_values(
    attn_backend: str | None = None,
    memory_backend: str | None = None,
    memory_compile: bool | None = None,
    memory_checkpoint_group: int | None = None,
) -> dict:
    """RuntimeConfig keyword arguments from the execution keys of an earlier ModelConfig."""
    out: dict = {}
    if attn_backend is not None:
        out["attn_backend"] = attn_backend
    if memory_compile is not None:
        compiled = "compile" if memory_compile else "eager"
        if memory_backend is not None and memory_backend != compiled:
            raise ValueError(
                f"model.memory_compile={memory_compile!r} contradicts "
                f"memory_backend={memory_backend!r}; set runtime.memory_backend alone"
            )
        out["memory_backend"] = compiled
    elif memory_backend is not None:
        out["memory_backend"] = memory_backend
    if memory_checkpoint_group is not None:
        out["memory_checkpoint_group"] = memory_checkpoint_group
    return out


def runtime_from_legacy(cfg) -> RuntimeConfig:
    """The runtime a ModelConfig built with the deprecated execution keys asked for (defaults for
    the keys it did not set): ``TitansLM(cfg)`` without a runtime runs as it did before."""
    return RuntimeConfig(**getattr(cfg, "legacy_runtime", {}))


def resolve_memory_backend(
    backend: str, device: torch.device, dims: list[int] | None = None, chunk: int = 0
) -> str:
    """The backend a memory with layer widths ``dims`` (d, hidden..., d) and chunk size ``chunk``
    runs on ``device``. ``triton`` needs CUDA, or CPU under TRITON_INTERPRET=1 (else a clear
    error). ``auto`` -> ``triton`` on CUDA when Triton works there and the kernel takes the shape
    with its state in registers (``kernels.kernel_fits_registers``), else ``compile`` on CUDA
    when inductor can generate code there (it needs Triton), else ``eager``. Not compile on CPU,
    where runs are short (tests, ``make train``'s 300 steps): for the tiny MAC a compiled step
    is faster (1.33 vs 1.77 s, batch 16 x 128, one thread), but
    the first step compiles for 158 s, which pays off only after ~360 steps (docs/memory.md).
    Ask for ``compile`` explicitly for long CPU runs.
    """
    if backend == "triton":
        problem = triton_device_problem(device)
        if problem:
            raise ValueError(f"runtime.memory_backend='triton': {problem}")
    if backend != "auto":
        return backend
    if device.type != "cuda" or not _inductor_on_cuda():
        return "eager"
    kernel = triton_importable() and dims is not None and kernel_shape_problem(dims, chunk) is None
    return "triton" if kernel and kernel_fits_registers(dims) else "compile"


def _inductor_on_cuda() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(torch._dynamo.is_dynamo_supported() and has_triton())
    except Exception:  # a broken Triton install: run eager rather than fail at the first step
        return False


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block of ``model.blocks`` in backward instead of keeping its activations.

    torchtitan's ``apply_ac`` replaces each block by ``checkpoint_wrapper(block)``, which puts
    ``_checkpoint_wrapped_module`` into every parameter name. DeepSpeed records parameters by
    those names (ZeRO partitions, universal checkpoints, zero_to_fp32), so the names must not
    change. torch's composable ``checkpoint`` runs the same non-reentrant recompute from forward
    hooks instead and leaves names, state_dict keys and the module tree as they are. Idempotent.
    """
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        if not getattr(block, "_activation_checkpointing", False):
            checkpoint(block)
            block._activation_checkpointing = True
    return model


def has_activation_checkpointing(model: nn.Module) -> bool:
    return any(getattr(b, "_activation_checkpointing", False) for b in model.blocks)


def warn_legacy(keys: list[str], stacklevel: int = 3) -> None:
    warnings.warn(
        f"ModelConfig({', '.join(keys)}=...) is deprecated: these are execution settings; pass "
        "TitansLM(cfg, runtime=RuntimeConfig(...)) (YAML: the runtime section)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
