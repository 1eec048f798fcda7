"""The neural memory over packed documents (docs/memory.md, "Documents"): ``NeuralMemory``'s
``doc_starts`` / ``valid`` paths, kept apart from the plain memory in memory.py. A mixin of
``NeuralMemory``: these methods run inside its ``forward`` and use only its own parameters, so
ZeRO-3's hooks have gathered them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .doc_layout import (
    conv_on_stream,
    conv_tail_at,
    gather_slots,
    place_buffer,
    scatter_slots,
    stream_layout,
)
from .memory_math import DocFlags, mlp_forward
from .memory_scan import autocast_off, memory_scan
from .memory_state import MemoryState, upcast


class DocumentsMixin:
    def _document_state(self, state: MemoryState | None, x: Tensor):
        """(M, S, buffer [G, chunk, .] or None, conv tail [B, K-1, 3D], doc_pos [B]) to continue."""
        B, n = x.shape[0], self.chunk_size
        tail = x.new_zeros(B, self.conv.shape[-1] - 1, 3 * self.dim)
        if state is None or state.weights is None:
            weights, momentum = self._initial(B)
            return weights, momentum, None, tail, torch.zeros(B, dtype=torch.long, device=x.device)
        if state.conv_tail is not None:
            tail = state.conv_tail
        doc_pos, buffer = state.doc_pos, state.buffer
        if doc_pos is None:  # a state written without documents: one document so far
            doc_pos = torch.full((B,), state.pos, dtype=torch.long, device=x.device)
            if buffer is not None:
                buffer = tuple(F.pad(b, (0, 0, 0, n - b.shape[1])) for b in buffer)
        return state.weights, state.momentum, buffer, tail, doc_pos

    def _document_starts(
        self, x: Tensor, state: MemoryState | None, doc_starts: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """(starts, valid) checked; with no state a document starts at the first valid token."""
        B, T = x.shape[:2]
        for name, t in (("doc_starts", doc_starts), ("valid", valid)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, T)}")
        starts = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        if doc_starts is not None:
            starts = doc_starts.to(device=x.device, dtype=torch.bool)
        valid = None if valid is None else valid.to(device=x.device, dtype=torch.bool)
        if state is None or state.weights is None:
            first = torch.zeros(B, 1, dtype=torch.long, device=x.device)
            if valid is not None:
                first = valid.long().argmax(1, keepdim=True)
            starts = starts.scatter(1, first, True)
        return starts, valid

    def _forward_documents(
        self,
        x: Tensor,
        state: MemoryState | None,
        doc_starts: Tensor | None,
        prefix: Tensor | None,
        valid: Tensor | None,
    ) -> tuple[Tensor, MemoryState]:
        """The memory over packed documents: tokens go to a stream where every document starts
        on a chunk boundary (``doc_layout.stream_layout``), one scan with resets runs over it, and
        each token's read comes back from its slot."""
        B, T, D = x.shape
        H, n, K = self.heads, self.chunk_size, self.conv.shape[-1]
        starts, valid = self._document_starts(x, state, doc_starts, valid)
        weights, momentum, buffer, tail, doc_pos = self._document_state(state, x)
        p = 0 if prefix is None else prefix.shape[1]
        lay = stream_layout(starts, doc_pos, p, n, valid)
        S, heads = lay.doc.shape[1], (lambda t: t.repeat_interleave(H, 0))
        slot_h = heads(lay.slot)

        # Projections before the conv, on the stream: P at prefix slots, the conv tail before slot r
        u = F.linear(x, self.w_qkv)
        base = u.new_zeros(B, S, 3 * D)
        if p:
            up = F.linear(prefix.to(x.dtype), self.w_qkv)[0][lay.prefix_index.clamp(min=0)]
            base = torch.where(lay.prefix_index[..., None] >= 0, up, base)
        # one more slot, S, for the tokens that are not valid
        base = scatter_slots(F.pad(base, (0, 0, 0, 1)), u, lay.slot)[:, :S]
        conv, u_s, doc_s = conv_on_stream(
            base, lay.doc, tail, doc_pos % n, lay.continues, self.conv
        )
        q, k, v = self._qkv_heads(conv)

        gates = []
        pidx = heads(lay.prefix_index)
        for g, pg in zip(self._gates(x), self._gates(prefix.to(x.dtype)) if p else [None] * 3):
            base = g.new_zeros(B * H, S + 1, g.shape[-1])
            if p:
                pg = pg.repeat(B, 1, 1).gather(
                    1, pidx.clamp(min=0)[..., None].expand(-1, -1, g.shape[-1])
                )
                base[:, :S] = torch.where(pidx[..., None] >= 0, pg, 0)
            gates.append(scatter_slots(base, g, slot_h)[:, :S])
        k, v, *gates = place_buffer(buffer, heads(lay.buffered), k, v, *gates)

        flags = DocFlags(self._initial(B)[0], heads(lay.reset), heads(lay.commit))
        with autocast_off(x.device.type):
            y, weights, momentum = memory_scan(
                weights, momentum, k, v, q, *gates, n, self.residual_norm, self.checkpoint_group,
                flags=flags, **self._backend(x),
            )  # fmt: skip

        # The state: every row's unfinished chunk, the conv inputs of its last document's last slots
        idx = (lay.end - lay.tail)[:, None] + torch.arange(n, device=x.device)
        kept = heads(torch.arange(n, device=x.device) < lay.tail[:, None])[..., None]
        idx_h = heads(idx.clamp(max=max(S - 1, 0)))
        buffer = tuple(torch.where(kept, gather_slots(t, idx_h), 0) for t in (k, v, *gates))
        tail = conv_tail_at(u_s, doc_s, lay.end, starts.long().sum(1), K)
        pos = (state.pos if state is not None else 0) + T
        new_state = MemoryState(weights, momentum, buffer, tail, pos, lay.doc_pos)

        y = gather_slots(y, slot_h.clamp(max=max(S - 1, 0)))
        if valid is not None:
            y = y * heads(valid)[..., None]
        y = self.out_norm(y.to(x.dtype))
        return self.to_out(self._merge(y, B) * F.silu(self.to_gate(x))), new_state

    def _retrieve_documents(
        self,
        x: Tensor,
        state: MemoryState | None,
        queries: Tensor | None,
        doc_starts: Tensor | None,
        valid: Tensor | None,
    ) -> tuple[Tensor, MemoryState]:
        """``_retrieve`` over a span whose valid tokens are contiguous in every row (a MAC
        segment): a row whose document starts in the span reads M_0, its conv starts empty."""
        B, T, D = x.shape
        K = self.conv.shape[-1]
        starts, valid = self._document_starts(x, state, doc_starts, valid)
        valid = torch.ones_like(starts) if valid is None else valid
        weights = state.weights if state is not None and state.weights else self._initial(B)[0]
        fresh = starts.any(1).repeat_interleave(self.heads, 0)[:, None, None]
        weights = [torch.where(fresh, w0, w) for w0, w in zip(self._initial(B)[0], weights)]
        tail = state.conv_tail if state is not None else None
        if queries is None:
            did = starts.long().cumsum(1)
            first = valid.long().argmax(1)
            continues = valid.any(1) & ~starts.gather(1, first[:, None])[:, 0]
            old = x.new_zeros(B, K - 1, D) if tail is None else tail
            u = F.linear(x, self.w_qkv[:D]) * valid[..., None]
            doc = torch.where(valid, did, -1)
            conv, u_s, d_s = conv_on_stream(u, doc, old, first, continues, self.conv[:D])
            end = T - valid.flip(1).long().argmax(1)
            tail = conv_tail_at(u_s, d_s, end, did[:, -1], K)
            tail = torch.where(valid.any(1)[:, None, None], tail, old)
            q = self._heads(F.silu(conv))
        else:
            q = queries.unsqueeze(0).expand(B, *queries.shape).flatten(0, 1)
        q = F.normalize(upcast(q), dim=-1)
        with autocast_off(x.device.type):
            y = mlp_forward(weights, q, self.residual_norm)[0]
        pos = (state.pos if state is not None else 0) + T
        return self._merge(y, B).to(x.dtype), MemoryState(weights, None, None, tail, pos)
