"""MAC, MAG, MAL, LMM and Transformer++ blocks on one Llama-style backbone (pre-norm, SwiGLU).

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

from .attention import Causal, KeyGroup, Visible, document_positions
from .config import ModelConfig
from .doc_layout import (
    document_starts,
    fit,
    gather_slots,
    grid_positions,
    on_grid,
    pick,
    row_window,
    stream_layout,
)
from .layers import KV, Docs, RMSNorm, SelfAttention, SwiGLU, append_kv
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
        self, x: Tensor, state: BlockState | None = None, doc_starts: Tensor | None = None
    ) -> tuple[Tensor, BlockState]:
        """``doc_starts`` ([B, T] bool): documents packed in each row restart at the marked tokens
        (docs/memory.md, "Documents"); a state that has seen documents keeps using them."""
        st = replace(state) if state is not None else BlockState()
        if doc_starts is None and st.doc_pos is None:
            x, st = self.mix(x, st)
        else:
            fresh = st.pos == 0 and st.doc_pos is None
            x, st = self.mix_documents(x, st, document_starts(x, fresh, doc_starts))
        return x + self.mlp(self.norm2(x)), st

    def mix(self, x: Tensor, st: BlockState) -> tuple[Tensor, BlockState]:
        raise NotImplementedError

    def mix_documents(self, x: Tensor, st: BlockState, starts: Tensor) -> tuple[Tensor, BlockState]:
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
        B = xn.shape[0]
        doc_pos = st.doc_pos
        if doc_pos is None:  # a state written without documents: one document so far
            doc_pos = torch.full((B,), st.pos, dtype=torch.long, device=xn.device)
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

    def mix_documents(self, x, st, starts):
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

    def mix_documents(self, x, st, starts):
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

    def mix_documents(self, x, st, starts):
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

    def mix_documents(self, x, st, starts):
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


class MACBlock(Block):
    """Memory as context (DESIGN 10), segment by segment:

    1. retrieve h = M_prev(q) with the memory as it stood before the segment;
    2. attend over [P | h | segment]: P visible to all, h_i visible to query j iff i <= j, the
       segment causal (``memory_tokens`` mode: N_l learned queries read M_prev, fully visible);
    3. write the attention outputs y into the memory, chunk by chunk, pre-normed like every mixer
       input (raw attention outputs are ~20x smaller than a normed stream, which made the memory's
       l2-normalised q/k tiny and its gradients ~100x larger than LMM's); ``mac_write: input``
       writes the segment's normed block input instead (a deviation: no read -> write loop),
       ``output_stopgrad`` writes y but passes no gradient from the write back into h;
    4. gate y with the per-token read of the memory after each write.
    """

    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__(cfg, runtime)
        self.memory = make_memory(cfg, self.runtime)
        self.h_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        # mac_write=input writes the normed input: no y_norm (an unused parameter would get no grad)
        self.y_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps) if cfg.mac_write != "input" else None
        self.combine = GatedCombine(cfg.dim, cfg.norm_eps)
        self.mem_queries = None
        if cfg.mac_retrieval == "memory_tokens":
            d = cfg.dim // cfg.mem_heads
            self.mem_queries = nn.Parameter(torch.empty(cfg.mem_heads, cfg.num_memory_tokens, d))
            no_weight_decay(self, "mem_queries")

    def mix(self, x, st):
        C, xn, outs, t = self.cfg.segment_len, self.norm1(x), [], 0
        while t < x.shape[1]:
            if st.pos % C == 0:  # a new segment: freeze the memory for retrieval, reset caches
                tail = st.retr.conv_tail if st.retr is not None else None
                weights = st.mem.weights if st.mem is not None else None
                st = replace(st, kv=None, kv_mem=None, retr=MemoryState(weights, None, None, tail))
            n = min(x.shape[1] - t, C - st.pos % C)
            o, st = self.segment(xn[:, t : t + n], st)
            outs.append(o)
            t += n
        return x + torch.cat(outs, dim=1), st

    def segment(self, xs: Tensor, st: BlockState) -> tuple[Tensor, BlockState]:
        B, n, _ = xs.shape
        pos, C = st.pos, self.cfg.segment_len
        q, q_nope, k, v = self.attn.project(xs, pos)
        groups = [] if self.persistent is None else [self.attn.prefix_group(self.persistent, B)]
        start = pos - (0 if st.kv is None else st.kv[0].shape[2])  # first key of this segment
        if self.mem_queries is None:
            h, retr = self.memory(xs, st.retr, read_only=True)
            hk, hv = self.attn.project_kv(self.h_norm(h), pos)  # h_i sits at position i
            kv_mem = append_kv(st.kv_mem, hk, hv, None)
            groups.append(KeyGroup(*kv_mem, Causal(q_start=pos, k_start=start, segment=C)))
        else:
            retr, kv_mem = st.retr, st.kv_mem
            if kv_mem is None:
                h, retr = self.memory(xs, st.retr, read_only=True, queries=self.mem_queries)
                g = self.attn.prefix_group(self.h_norm(h), B)
                kv_mem = (g.k, g.v)
            groups.append(KeyGroup(*kv_mem, Visible()))
        kv = append_kv(st.kv, k, v, None)
        groups.append(KeyGroup(*kv, Causal(q_start=pos, k_start=start, segment=C)))
        y = self.attn.attend(q, q_nope, groups)
        m, mem = self.memory(self.write_input(y, xs, q, q_nope, groups), st.mem)
        st = replace(st, pos=pos + n, kv=kv, kv_mem=kv_mem, mem=mem, retr=retr)
        return self.combine(y, m), st

    def write_input(
        self, y: Tensor, xs: Tensor, q: Tensor, q_nope: Tensor, groups: list[KeyGroup]
    ) -> Tensor:
        """What the segment writes (``mac_write``): RMSNorm(y) (the paper), its normed input, or
        RMSNorm(y) with no gradient from the write back into the retrieved h (``output_stopgrad``:
        the same values, y recomputed over a detached h group, the one before the segment's)."""
        if self.y_norm is None:
            return xs
        if self.cfg.mac_write == "output_stopgrad" and torch.is_grad_enabled():
            h = groups[-2]
            cut = KeyGroup(h.k.detach(), h.v.detach(), h.rule)
            y = self.attn.attend(q, q_nope, [*groups[:-2], cut, groups[-1]])
        return self.y_norm(y)

    def mix_documents(self, x, st, starts):
        """``mix`` with packed documents, on a grid where every document starts on a segment
        boundary (``stream_layout`` aligned to C): a grid segment then holds one document per row,
        so the segment loop and its Causal rules stay as they are. Slots of segment 0 that an
        earlier call filled take their keys from the state's caches (``held``)."""
        B, T, _ = x.shape
        C, dev = self.cfg.segment_len, x.device
        doc_pos = st.doc_pos
        if doc_pos is None:  # a state written without documents: one document so far
            doc_pos = torch.full((B,), st.pos, dtype=torch.long, device=dev)
        lay = stream_layout(starts, doc_pos, 0, C)
        S = -(-lay.doc.shape[1] // C) * C
        valid = on_grid(x.new_ones(B, T, 1), lay.slot, S)[..., 0] > 0
        begins = on_grid(starts[..., None].to(x.dtype), lay.slot, S)[..., 0] > 0
        pos = grid_positions(lay, doc_pos, C, S)
        xg = on_grid(self.norm1(x), lay.slot, S)
        q, q_nope, k, v = self.attn.project(xg, pos)
        phase = torch.where(lay.continues, doc_pos % C, 0)
        held = (torch.arange(S, device=dev) < phase[:, None])[:, None, :, None]
        if st.kv is not None:
            k, v = (torch.where(held, fit(c, S), t) for c, t in zip(st.kv, (k, v)))

        mem, tail, outs, h_keys, retr_ws = st.mem, None, [], [], []
        if st.retr is not None:
            tail = st.retr.conv_tail
        prefix = [] if self.persistent is None else [self.attn.prefix_group(self.persistent, B)]
        for g in range(S // C):
            sl, rule = slice(g * C, (g + 1) * C), Causal(q_start=g * C, k_start=g * C, segment=C)
            weights = mem.weights if mem is not None else None
            if g == 0 and st.retr is not None and st.retr.weights is not None:
                mid = (phase > 0).repeat_interleave(self.memory.heads, 0)[:, None, None]
                weights = [torch.where(mid, a, b) for a, b in zip(st.retr.weights, weights)]
            retr_in = MemoryState(weights, None, None, tail)
            docs = dict(read_only=True, doc_starts=begins[:, sl], valid=valid[:, sl])
            if self.mem_queries is None:
                h, retr = self.memory(xg[:, sl], retr_in, **docs)
                hk, hv = self.attn.project_kv(self.h_norm(h), pos[:, sl])
                if g == 0 and st.kv_mem is not None:
                    hk, hv = (
                        torch.where(held[:, :, :C], fit(c, C), t)
                        for c, t in zip(st.kv_mem, (hk, hv))
                    )
                group = KeyGroup(hk, hv, rule)
            else:
                h, retr = self.memory(xg[:, sl], retr_in, queries=self.mem_queries, **docs)
                group = self.attn.prefix_group(self.h_norm(h), B)
                hk, hv = group.k, group.v
                if g == 0 and st.kv_mem is not None:
                    mid = (phase > 0)[:, None, None, None]
                    hk, hv = (torch.where(mid, c, t) for c, t in zip(st.kv_mem, (hk, hv)))
                group = KeyGroup(hk, hv, Visible())
            groups = [*prefix, group, KeyGroup(k[:, :, sl], v[:, :, sl], rule)]
            y = self.attn.attend(q[:, :, sl], q_nope[:, :, sl], groups)
            w = self.write_input(y, xg[:, sl], q[:, :, sl], q_nope[:, :, sl], groups)
            m, mem = self.memory(w, mem, doc_starts=begins[:, sl], valid=valid[:, sl])
            outs.append(self.combine(y, m))
            h_keys.append((hk, hv))
            retr_ws.append(retr.weights)
            tail = retr.conv_tail

        # The state: each row's last segment (its caches, its retrieval weights)
        last = (lay.end - 1).clamp(min=0) // C
        kv = tuple(row_window(t, last * C, C) for t in (k, v))
        if self.mem_queries is None:
            kv_mem = tuple(row_window(torch.cat(t, 2), last * C, C) for t in zip(*h_keys))
        else:
            kv_mem = tuple(pick(list(t), last) for t in zip(*h_keys))
        rows = last.repeat_interleave(self.memory.heads, 0)
        retr = MemoryState([pick(list(w), rows) for w in zip(*retr_ws)], None, None, tail)
        out = gather_slots(torch.cat(outs, 1), lay.slot.clamp(max=S - 1))
        st = replace(st, pos=st.pos + T, kv=kv, kv_mem=kv_mem, mem=mem, retr=retr)
        return x + out, replace(st, doc_pos=lay.doc_pos)


BLOCKS = {
    "mac": MACBlock,
    "mag": MAGBlock,
    "mal": MALBlock,
    "lmm": LMMBlock,
    "transformer": TransformerBlock,
}
