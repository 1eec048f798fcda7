"""MAC, memory as context (DESIGN 10): the paper's headline block, segment by segment."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch import Tensor

from .attention import Causal, KeyGroup, Visible
from .blocks import Block, BlockState, GatedCombine, current_doc_pos, make_memory
from .config import ModelConfig
from .doc_layout import (
    StreamLayout,
    fit,
    gather_slots,
    grid_positions,
    on_grid,
    pick,
    row_window,
    stream_layout,
)
from .layers import RMSNorm, append_kv
from .memory import MemoryState
from .policy import no_weight_decay
from .runtime import RuntimeConfig


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

    def documents_grid(self, x, state, doc_starts):
        st = state if state is not None else BlockState()
        starts = self.starts(x, st, doc_starts)
        lay = stream_layout(starts, current_doc_pos(st, x), 0, self.cfg.segment_len)
        return self._grid_len(lay)

    def _grid_len(self, lay: StreamLayout) -> int:
        C = self.cfg.segment_len
        return -(-lay.doc.shape[1] // C) * C

    def mix_documents(self, x, st, starts, grid=0):
        """``mix`` with packed documents, on a grid where every document starts on a segment
        boundary (``stream_layout`` aligned to C): a grid segment then holds one document per row,
        so the segment loop and its Causal rules stay as they are. Slots of segment 0 that an
        earlier call filled take their keys from the state's caches (``held``).

        The grid's length, and so the number of module calls, depends on where documents start.
        ``grid`` pads it with segments of padding to a length agreed by data-parallel ranks
        (``TitansLM.layout_agree``): ZeRO-3 gathers parameters call by call."""
        B, T, _ = x.shape
        C, dev = self.cfg.segment_len, x.device
        doc_pos = current_doc_pos(st, x)
        lay = stream_layout(starts, doc_pos, 0, C)
        if grid % C:
            raise ValueError(f"grid={grid} is not a multiple of segment_len={C}")
        S = max(self._grid_len(lay), grid)
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
