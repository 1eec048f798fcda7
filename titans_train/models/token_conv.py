"""A short causal depthwise convolution on the token embeddings: x + conv(x) (``token_conv``).

Not in the paper. Titans' memory mixes neighbouring tokens with its own conv on q, k and v
(``conv_kernel``); a Transformer++ has no such mixing, and at the study's size it did not learn
to match two-token MQAR keys (it cannot even copy the second digit), while the same model with
this conv of width 4 learned it (docs/results.md, "The full-attention control on MQAR"). It is an
option for any variant, off by default (``token_conv: 0``), zero-initialised so a new model starts
as the plain one.

Streaming: the last K-1 embeddings are carried (``LMState.token_tail``), so streaming equals one
call. Documents (``doc_starts``): a tap never reaches a token of an earlier document, and the
carried tail keeps only the last document's tokens (the others are zeroed), so the next call can
continue it or start a new one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .memory import causal_conv


class TokenConv(nn.Module):
    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, 1, kernel))  # as the memory's conv: [C, 1, K]
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(
        self, x: Tensor, tail: Tensor | None, doc_starts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x [B, T, D], tail [B, K-1, D] or None (zeros), doc_starts [B, T] bool or None.
        Returns (x + conv(x) + bias, the tail to carry)."""
        K = self.weight.shape[-1]
        if K == 1 or doc_starts is None:
            y, new_tail = causal_conv(x, self.weight, tail)
            return x + y + self.bias.to(x.dtype), new_tail
        if tail is None:
            tail = x.new_zeros(x.shape[0], K - 1, x.shape[-1])
        xx = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        starts = torch.cat([doc_starts.new_zeros(x.shape[0], K - 1), doc_starts], dim=1)
        doc = starts.long().cumsum(1)  # document index of every position, tail included
        T = x.shape[1]
        w = self.weight[:, 0].t().to(x.dtype)  # [K, D]; tap j reads position t + j of xx
        y = torch.zeros_like(x)
        for j in range(K):
            same = (doc[:, j : j + T] == doc[:, K - 1 :]).unsqueeze(-1).to(x.dtype)
            y = y + xx[:, j : j + T] * w[j] * same
        keep = (doc[:, -(K - 1) :] == doc[:, -1:]).unsqueeze(-1).to(x.dtype)
        return x + y + self.bias.to(x.dtype), xx[:, -(K - 1) :] * keep
