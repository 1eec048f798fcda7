"""What a NeuralMemory carries from one call to the next (docs/memory.md, "State")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MemoryState:
    """Everything needed to continue a sequence exactly where a previous call stopped.

    weights/momentum: M and S at the last chunk boundary, each [B*H, d_in, d_out] per memory layer.
    buffer: the tokens written since that boundary (k, v, theta, log_eta, log_keep), [B*H, r, .],
        whose gradients are still taken at ``weights`` (DESIGN 1); None at a boundary.
    conv_tail: the last (kernel - 1) projected inputs before the causal conv, [B, kernel-1, C].
    pos: tokens written so far; chunk boundaries are absolute positions (pos % chunk == r).
    doc_pos: with documents (``doc_starts``), [B] stream tokens of every row's current document
        (persistent tokens included); chunk boundaries are then relative to the document's start,
        and ``buffer`` is [B*H, chunk, .] with the first doc_pos % chunk tokens of a row valid.
    The current weights M_t are a function of these (``NeuralMemory.current_weights``).
    """

    weights: list[Tensor] | None
    momentum: list[Tensor] | None
    buffer: tuple[Tensor, ...] | None
    conv_tail: Tensor | None
    pos: int = 0
    doc_pos: Tensor | None = None

    def detach(self) -> MemoryState:
        """Cut the autograd graph (truncated backprop through time)."""

        def d(x):
            if x is None:
                return None
            if isinstance(x, (list, tuple)):
                return type(x)(t.detach() for t in x)
            return x.detach()

        return MemoryState(
            d(self.weights), d(self.momentum), d(self.buffer), d(self.conv_tail), self.pos,
            self.doc_pos,
        )  # fmt: skip


def upcast(x: Tensor) -> Tensor:
    """The inner loop runs in at least float32 (bf16 weights drift over thousands of updates)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
