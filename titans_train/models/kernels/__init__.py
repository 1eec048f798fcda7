"""Fused kernels for the memory's chunk loop (issue 14). Triton is optional: this package imports
without it, and ``memory_triton`` (which imports triton) is loaded only when the backend is used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor

# Largest M + S (all memory layers, in elements) for which ``auto`` picks the kernel on CUDA: one
# program holds its group's whole state in registers. Compiled by ptxas for sm80/sm90 at 8 warps,
# 4,096 values (d 16, hidden 64) do not spill, 8,192 (d 64, depth 1) spill 8 bytes a thread and
# 16,384 (d 32, hidden 128) 400-1,400. Larger heads need the split kernel (docs/memory.md).
AUTO_STATE_ELEMENTS = 8192
# The streamed kernel's four state tiles (W, S of both layers, 4 x d_block x tile values): at
# head dim 64 / hidden 256, tiles of 16 (4,096 values) spill 16 bytes a thread on sm90 (280 on
# sm80), tiles of 32 640 (1,056); head dim 48 / hidden 192 at 16: 40 (176).
STREAM_TILE_ELEMENTS = 4096


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_device_problem(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` (None if it can)."""
    if not triton_importable():
        return "triton is not installed (pip install 'titans_train[dev]' or triton)"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1, not on {device.type}"


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def block_width(d: int) -> int:
    """The kernels' block for a layer width ``d``: the next power of two (``tl.arange`` needs
    one), at least 16 (matmul rows; fp32 ``tl.dot`` needs a reduction of at least 8 on NVIDIA,
    triton/backends/nvidia/compiler.py min_dot_size). Masks keep the padding at zero."""
    return max(16, 1 << (d - 1).bit_length())


def kernel_shape_problem(dims: list[int], chunk: int) -> str | None:
    """Why the kernel cannot take a memory with layer widths ``dims`` (d, hidden..., d) and this
    chunk size (None if it can). Any width >= 1 (padded to ``block_width``); the chunk is a
    block of tokens and must be a power of two >= 8 itself."""
    if len(dims) - 1 not in (1, 2):
        return f"memory depth {len(dims) - 1} (the kernel has depth 1 and 2)"
    if min(dims) < 1:
        return f"memory widths {dims} (must be >= 1)"
    if not (_pow2(chunk) and chunk >= 8):
        return f"chunk size {chunk} (powers of two >= 8 only)"
    return None


def state_elements(dims: list[int]) -> int:
    """M + S of all memory layers as the kernel holds them (padded widths), in elements."""
    blocks = [block_width(d) for d in dims]
    return 2 * sum(a * b for a, b in zip(blocks[:-1], blocks[1:]))


def kernel_fits_registers(dims: list[int]) -> bool:
    return state_elements(dims) <= AUTO_STATE_ELEMENTS


def stream_tile(dims: list[int]) -> int:
    """0 when the register kernel holds the whole state (it fits, or depth 1); otherwise the
    hidden tile of the streamed kernel (``memory_triton_streamed``): the largest power of two
    from 16 to the hidden block whose four state tiles (4 x d_block x tile) fit
    ``STREAM_TILE_ELEMENTS``."""
    if len(dims) != 3 or kernel_fits_registers(dims):
        return 0
    bd, bh, tile = block_width(dims[0]), block_width(dims[1]), 16
    while 2 * tile <= bh and 4 * bd * 2 * tile <= STREAM_TILE_ELEMENTS:
        tile *= 2
    return tile


def backward_tile(dims: list[int]) -> int:
    """The hidden tile of the fused backward: 16 (the streamed backward) at depth 2, whatever
    the forward ran; 0 (the register backward) at depth 1. ptxas, sm90, 8 warps: the register
    backward at head dim 16 / hidden 64 spills 1,368 bytes a thread, the streamed one at tiles of
    16 none (tiles of 32: 24, of 64: 648); head dim 64 / hidden 256: 512. In the interpreter a
    state within the register budget takes one tile: its time grows with the tile count (4.5x
    the register backward at 4 tiles, 1.6x at one), and tests run several tiles explicitly."""
    if len(dims) != 3:
        return 0
    if interpreting() and kernel_fits_registers(dims):
        return block_width(dims[1])
    return 16


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (a no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def span_gates(theta: Tensor, log_eta: Tensor, log_keep: Tensor, chunk: int) -> list[Tensor]:
    """The gates of every whole chunk of a span, [G, N, P] -> [P, G, chunks, chunk] each
    (``memory_math.span_coeffs``' layout of B_t0): handed to the kernels in place of the five
    coefficient tensors, they compute each chunk's coefficients (and the backward the gates'
    gradients) themselves."""
    G, N, _ = theta.shape
    return [
        x.reshape(G, N // chunk, chunk, -1).permute(3, 0, 1, 2).contiguous()
        for x in (theta, log_eta, log_keep)
    ]
