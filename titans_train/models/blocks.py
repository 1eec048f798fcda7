"""The Llama-style backbone (pre-norm, SwiGLU) and its MAG, MAL, LMM and Transformer++ blocks;
MAC, which shares it, is in mac_block.py.

Each block maps (x [B, T, D], state) -> (x, state). ``state=None`` starts a sequence at position
0; passing the returned state continues it exactly (DESIGN 1: streaming equals one call). Persistent
tokens P (DESIGN 8) are learned per layer and position-free; where the paper feeds the memory
``P || x`` (MAG, MAL, LMM) the memory writes P first, once, at the start of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import Tensor

from .attention import document_positions
from .config import ModelConfig
from .doc_layout import (
    document_starts,
)
from .layers import KV, Docs, RMSNorm, SelfAttention, SwiGLU
from .memory import MemoryState, NeuralMemory
from .policy import no_weight_decay, residual_proj
from .runtime import RuntimeConfig, runtime_from_legacy


@dataclass
class BlockState:
    pos: int = 0  # sequence tokens seen (persistent tokens excluded)
    kv: KV | None = None  # attention keys/values later queries still see
    kv_docs: Docs | None = None  # with documents: their document (0 = current) and position
    kv_mem: KV | None = None  # MAC: keys/values of the retrieved memory in the current segment
    mem: MemoryState | None = None  # the memory this block writes
    retr: MemoryState | None = None  # MAC: retrieval view (segment-start weights, own conv tail)
    prefix: Tensor | None = None  # MAL: persistent tokens after the memory sublayer
    doc_pos: Tensor | None = None  # with documents: [B] tokens of each row's current document

    def detach(self) -> BlockState:
        def d(x):
            return None if x is None else tuple(t.detach() for t in x)

        return BlockState(
            self.pos,
            d(self.kv),
            self.kv_docs,
            d(self.kv_mem),
            self.mem and self.mem.detach(),
            self.retr and self.retr.detach(),
            None if self.prefix is None else self.prefix.detach(),
            self.doc_pos,
        )


def make_memory(cfg: ModelConfig, runtime: RuntimeConfig | None = None) -> NeuralMemory:
    runtime = runtime or runtime_from_legacy(cfg)
    return NeuralMemory(
        cfg.dim,
        cfg.mem_heads,
        chunk_size=cfg.chunk_size,
        depth=cfg.memory_depth,
        expansion=cfg.memory_expansion,
        conv_kernel=cfg.conv_kernel,
        max_lr=cfg.memory_max_lr,
        per_layer_gates=cfg.memory_per_layer_gates,
        residual_norm=cfg.memory_residual_norm,
        forget_bias=cfg.memory_forget_bias,
        checkpoint_group=runtime.memory_checkpoint_group,
        backend=runtime.memory_backend,
        one_thread_loops=runtime.cpu_threads == "auto",
    )


def current_doc_pos(st: BlockState, x: Tensor) -> Tensor:
    """[B] tokens of each row's current document; a state written without documents has seen
    one document so far."""
    if st.doc_pos is not None:
        return st.doc_pos
    return torch.full((x.shape[0],), st.pos, dtype=torch.long, device=x.device)


class Block(nn.Module):
    """Shared parts: pre-norms, SwiGLU, persistent tokens; subclasses define ``mix``."""

    def __init__(
        self, cfg: ModelConfig, runtime: RuntimeConfig | None = None, attention: bool = True
    ):
        super().__init__()
        self.cfg, self.runtime = cfg, runtime or runtime_from_legacy(cfg)
        self.norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        if attention:
            self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.rope_theta, self.runtime.attn_backend)
        n_p = cfg.num_persistent
        self.persistent = nn.Parameter(torch.empty(1, n_p, cfg.dim)) if n_p else None
        if self.persistent is not None:
            no_weight_decay(self, "persistent")

    def forward(
        self,
        x: Tensor,
        state: BlockState | None = None,
        doc_starts: Tensor | None = None,
        grid: int = 0,
    ) -> tuple[Tensor, BlockState]:
        """``doc_starts`` ([B, T] bool): documents packed in each row restart at the marked tokens
        (docs/memory.md, "Documents"); a state that has seen documents keeps using them.
        ``grid``: the least length of a documents grid, for blocks that lay documents out on one
        (MAC, ``documents_grid``); the others ignore it."""
        st = replace(state) if state is not None else BlockState()
        if doc_starts is None and st.doc_pos is None:
            x, st = self.mix(x, st)
        else:
            x, st = self.mix_documents(x, st, self.starts(x, st, doc_starts), grid)
        return x + self.mlp(self.norm2(x)), st

    @staticmethod
    def starts(x: Tensor, st: BlockState, doc_starts: Tensor | None) -> Tensor:
        """The [B, T] document starts of a call on state ``st``, checked."""
        return document_starts(x, st.pos == 0 and st.doc_pos is None, doc_starts)

    def documents_grid(
        self, x: Tensor, state: BlockState | None, doc_starts: Tensor | None
    ) -> int | None:
        """The grid length the documents path would use for this call, None for blocks without
        a grid (their module calls do not depend on where documents start)."""
        return None

    def mix(self, x: Tensor, st: BlockState) -> tuple[Tensor, BlockState]:
        raise NotImplementedError

    def mix_documents(
        self, x: Tensor, st: BlockState, starts: Tensor, grid: int = 0
    ) -> tuple[Tensor, BlockState]:
        raise NotImplementedError(f"{type(self).__name__} does not take doc_starts yet")

    def write_memory(self, xn: Tensor, st: BlockState) -> tuple[Tensor, MemoryState]:
        """Memory over P || xn: P is written once, at the start of a sequence; its reads dropped."""
        if st.mem is None and st.pos == 0 and self.persistent is not None:
            n_p = self.persistent.shape[1]
            p = self.persistent.expand(xn.shape[0], -1, -1).to(xn.dtype)
            m, mem = self.memory(torch.cat([p, xn], dim=1))
            return m[:, n_p:], mem
        return self.memory(xn, st.mem)

    def attend_documents(
        self, xn: Tensor, st: BlockState, starts: Tensor, prefix: Tensor | None
    ) -> tuple[Tensor, BlockState]:
        """Sliding-window attention over packed documents; returns the output and the state's
        attention fields (caches, positions) after the call."""
        B, doc_pos = xn.shape[0], current_doc_pos(st, xn)
        doc, pos, _ = document_positions(starts, (torch.zeros_like(doc_pos), doc_pos))
        docs = (doc, pos)  # document 0: the one the state's cache belongs to
        cache_docs = st.kv_docs
        if st.kv is not None and cache_docs is None:
            n = st.kv[0].shape[2]
            cache_docs = (
                torch.zeros(B, n, dtype=torch.long, device=xn.device),
                doc_pos[:, None] - n + torch.arange(n, device=xn.device),
            )
        if cache_docs is not None:  # a row that starts a document at 0 sees none of its cache
            cache_docs = (torch.where(starts[:, :1], -1, cache_docs[0]), cache_docs[1])
        y, kv, kv_docs = self.attn.sliding_documents(
            xn, docs, st.kv, cache_docs, self.cfg.window, prefix
        )
        pos = st.pos + xn.shape[1]
        return y, replace(st, pos=pos, kv=kv, kv_docs=kv_docs, doc_pos=docs[1][:, -1] + 1)

    def write_documents(
        self, xn: Tensor, st: BlockState, starts: Tensor
    ) -> tuple[Tensor, MemoryState]:
        """Memory over P || document for every document packed in xn: P at each start."""
        p = None if self.persistent is None else self.persistent.to(xn.dtype)
        return self.memory(xn, st.mem, doc_starts=starts, prefix=p)


class TransformerBlock(Block):
    """Transformer++: sliding-window (or full) attention, optional persistent tokens."""

    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__(cfg, runtime)
        self.attn_out = residual_proj(nn.Linear(cfg.dim, cfg.dim, bias=False))

    def mix(self, x, st):
        y, kv = self.attn.sliding(self.norm1(x), st.pos, st.kv, self.cfg.window, self.persistent)
        return x + self.attn_out(y), replace(st, pos=st.pos + x.shape[1], kv=kv)

    def mix_documents(self, x, st, starts, grid=0):
        y, st = self.attend_documents(self.norm1(x), st, starts, self.persistent)
        return x + self.attn_out(y), st


class GatedCombine(nn.Module):
    """o = W_o(RMSNorm(y) * sigmoid(RMSNorm(m))) (DESIGN 11; reused by MAC's gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.y_norm = RMSNorm(dim, eps=eps)
        self.m_norm = RMSNorm(dim, eps=eps)
        self.out = residual_proj(nn.Linear(dim, dim, bias=False))

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.out(self.y_norm(y) * torch.sigmoid(self.m_norm(m)))


class MAGBlock(Block):
    """Memory as a gate: SWA* over [P | window] and the LMM over P || x, combined by a gate."""

    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__(cfg, runtime)
        self.memory = make_memory(cfg, self.runtime)
        self.combine = GatedCombine(cfg.dim, cfg.norm_eps)

    def mix(self, x, st):
        xn = self.norm1(x)
        m, mem = self.write_memory(xn, st)
        y, kv = self.attn.sliding(xn, st.pos, st.kv, self.cfg.window, self.persistent)
        return x + self.combine(y, m), replace(st, pos=st.pos + x.shape[1], kv=kv, mem=mem)

    def mix_documents(self, x, st, starts, grid=0):
        xn = self.norm1(x)
        m, mem = self.write_documents(xn, st, starts)
        y, st = self.attend_documents(xn, st, starts, self.persistent)
        return x + self.combine(y, m), replace(st, mem=mem)


class LMMBlock(Block):
    """The memory alone as the token mixer (no attention)."""

    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__(cfg, runtime, attention=False)
        self.memory = make_memory(cfg, self.runtime)

    def mix(self, x, st):
        m, mem = self.write_memory(self.norm1(x), st)
        return x + m, replace(st, pos=st.pos + x.shape[1], mem=mem)

    def mix_documents(self, x, st, starts, grid=0):
        m, mem = self.write_documents(self.norm1(x), st, starts)
        return x + m, replace(st, pos=st.pos + x.shape[1], mem=mem, doc_pos=mem.doc_pos)


class MALBlock(Block):
    """Memory as a layer: residual LMM sublayer, then residual SWA sublayer (DESIGN 12).

    P || x runs through the LMM sublayer; the P positions of the result are the SWA's persistent
    prefix, kept in the state for later calls.
    """

    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__(cfg, runtime)
        self.memory = make_memory(cfg, self.runtime)
        self.norm_attn = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn_out = residual_proj(nn.Linear(cfg.dim, cfg.dim, bias=False))

    def mix(self, x, st):
        prefix, mem = st.prefix, st.mem
        if mem is None and st.pos == 0 and self.persistent is not None:
            n_p = self.persistent.shape[1]
            s = torch.cat([self.persistent.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            m, mem = self.memory(self.norm1(s))
            s = s + m
            prefix, x = s[:, :n_p], s[:, n_p:]
        else:
            m, mem = self.memory(self.norm1(x), mem)
            x = x + m
        p = None if prefix is None else self.norm_attn(prefix)
        y, kv = self.attn.sliding(self.norm_attn(x), st.pos, st.kv, self.cfg.window, p)
        x = x + self.attn_out(y)
        return x, replace(st, pos=st.pos + x.shape[1], kv=kv, mem=mem, prefix=prefix)

    def mix_documents(self, x, st, starts, grid=0):
        prefix, p = st.prefix, None
        if self.persistent is not None:
            # P after the memory sublayer is the same for every document (M_0, an empty conv):
            # computed once, as at the start of a sequence
            p = self.norm1(self.persistent.to(x.dtype))
            if prefix is None:
                prefix = self.persistent.to(x.dtype) + self.memory(p)[0]
                prefix = prefix.expand(x.shape[0], -1, -1)
        m, mem = self.memory(self.norm1(x), st.mem, doc_starts=starts, prefix=p)
        x = x + m
        pn = None if prefix is None else self.norm_attn(prefix)
        y, st = self.attend_documents(self.norm_attn(x), st, starts, pn)
        return x + self.attn_out(y), replace(st, mem=mem, prefix=prefix)
