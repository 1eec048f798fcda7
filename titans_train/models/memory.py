"""NeuralMemory: the Titans long-term memory (LMM) as a token mixer, with explicit streaming state.

DESIGN decisions 1-7: per-token data-dependent gates, q/k/v = l2(SiLU(causal depthwise conv(W x))),
a per-head MLP memory with learned initial weights M_0, chunked training with gradients at the
chunk-start weights, reads after the token's own write, output W_o(RMSNorm(y) * SiLU(W_g x)).

The module owns every parameter it uses and uses them only inside its own ``forward`` (no vmap,
no calls into sub-module weights from outside), so DeepSpeed ZeRO-3 can gather them with its hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
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
from .memory_math import DocFlags, chunk_coeffs, chunk_step, layer_coeffs, mlp_forward
from .memory_scan import autocast_off, memory_scan
from .policy import no_weight_decay, residual_proj
from .runtime import RuntimeConfig, resolve_memory_backend


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


def causal_conv(x: Tensor, weight: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over time. x: [B, T, C], weight: [C, 1, K], tail: [B, K-1, C].

    Written as K shifted multiply-adds: on CPU this is ~40x faster in backward than the
    depthwise conv1d kernel, and it is exact.
    """
    K, T = weight.shape[-1], x.shape[1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], K - 1, x.shape[-1])
    xx = torch.cat([tail.to(x.dtype), x], dim=1)
    w = weight[:, 0].t().to(x.dtype)  # [K, C]
    y = xx[:, :T] * w[0]
    for j in range(1, K):
        y = y + xx[:, j : j + T] * w[j]
    return y, xx[:, xx.shape[1] - (K - 1) :]


class NeuralMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        chunk_size: int = 16,
        depth: int = 2,
        expansion: int = 4,
        conv_kernel: int = 4,
        max_lr: float = 0.1,
        per_layer_gates: bool = False,
        residual_norm: bool = True,
        forget_bias: float = -5.0,
        checkpoint_group: int = 0,
        backend: str = "eager",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"memory dim {dim} is not divisible by heads {heads}")
        RuntimeConfig(memory_backend=backend, memory_checkpoint_group=checkpoint_group)  # checks
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.depth, self.max_lr = chunk_size, depth, max_lr
        self.residual_norm = residual_norm
        self.forget_bias = forget_bias  # initial pre-sigmoid bias of alpha (reset_parameters)
        self.checkpoint_group = checkpoint_group  # chunks per activation-checkpoint group; 0 = off
        self.backend = backend  # eager | compile | triton | auto (resolved per device and call)
        self.n_gates = depth if per_layer_gates else 1
        d = self.head_dim
        # Owned directly (not nn.Linear) so read-only calls can use the q rows alone under ZeRO-3.
        self.w_qkv = nn.Parameter(torch.empty(3 * dim, dim))
        self.conv = nn.Parameter(torch.empty(3 * dim, 1, conv_kernel))
        self.to_gates = nn.Linear(dim, 3 * heads * self.n_gates)  # theta, eta, alpha per head
        dims = [d] + [expansion * d] * (depth - 1) + [d]
        self.init_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(heads, a, b)) for a, b in zip(dims[:-1], dims[1:])]
        )
        no_weight_decay(self.init_weights, *(str(i) for i in range(depth)))  # M_0: a state
        self.out_norm = nn.RMSNorm(d, eps=1e-6)
        self.to_gate = nn.Linear(dim, dim, bias=False)  # W_g
        self.to_out = residual_proj(nn.Linear(dim, dim, bias=False))  # W_o
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        # Unit-scale q/k/v (like nn.Linear's default), not the LM's 0.02: the memory's targets v
        # must be comparable to its output M(k) = k + LN(MLP(k)), which is O(1). With v ~ 0.05
        # its first writes only shrink the output, and in-context copying was learned ~2x slower
        # (docs/memory.md, "Value scale").
        nn.init.normal_(self.w_qkv, std=1 / math.sqrt(self.dim))
        nn.init.uniform_(
            self.conv, -1 / math.sqrt(self.conv.shape[-1]), 1 / math.sqrt(self.conv.shape[-1])
        )
        for w in self.init_weights:
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[-2]))
        nn.init.normal_(self.to_gates.weight, std=std)
        # Small inner steps at init: theta = max_lr * sigmoid(-2) ~ 0.012 (max_lr 0.1), eta = 0.5,
        # alpha = sigmoid(forget_bias), by default sigmoid(-5) ~ 0.007. With large steps (max_lr
        # 0.5, theta 0.25, eta ~ 0.9) the deep memory's inner descent overshoots and training turns
        # chaotic: runs that differ only in fp32 reduction order drift 1e-3 apart within 10 steps
        # (docs/memory.md, "Inner step size"). A lower forget_bias keeps writes across segments.
        bias = self.to_gates.bias.detach().view(3, -1)
        bias[0].fill_(-2.0)
        bias[1].fill_(0.0)
        bias[2].fill_(self.forget_bias)

    # -- helpers -----------------------------------------------------------------------------
    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, H*d] -> [B*H, T, d]"""
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2).reshape(B * self.heads, T, -1)

    def _merge(self, y: Tensor, B: int) -> Tensor:
        """[B*H, T, d] -> [B, T, H*d]"""
        return y.view(B, self.heads, y.shape[1], -1).transpose(1, 2).reshape(B, y.shape[1], -1)

    def _initial(self, B: int) -> tuple[list[Tensor], list[Tensor]]:
        ws = [
            upcast(w).unsqueeze(0).expand(B, *w.shape).reshape(B * self.heads, *w.shape[1:])
            for w in self.init_weights
        ]
        return ws, [torch.zeros_like(w) for w in ws]

    def _backend(self, x: Tensor) -> dict:
        """memory_scan's execution switches for this call's device and the memory's shape."""
        dims = [self.head_dim] + [w.shape[-1] for w in self.init_weights]
        backend = resolve_memory_backend(self.backend, x.device, dims, self.chunk_size)
        return {"compiled": backend == "compile", "triton": backend == "triton"}

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token, per-head (and optionally per-layer) gates as [B*H, T, P] (float32)."""
        B, T, _ = x.shape
        g = upcast(self.to_gates(x)).view(B, T, 3, self.heads, self.n_gates)
        g = g.permute(2, 0, 3, 1, 4).reshape(3, B * self.heads, T, self.n_gates)
        theta = self.max_lr * torch.sigmoid(g[0])
        return theta, F.logsigmoid(g[1]), F.logsigmoid(-g[2])  # theta, log eta, log(1 - alpha)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        state: MemoryState | None = None,
        read_only: bool = False,
        queries: Tensor | None = None,
        doc_starts: Tensor | None = None,
        prefix: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, MemoryState]:
        """x: [B, T, D]. Returns (output [B, T, D], new state).

        Default: write each token into the memory and read it back after its own write, then gate
        and project (the LMM mixer). ``read_only=True`` retrieves M(q_t) at the state's chunk-start
        weights without writing (MAC retrieval) and returns the raw reads, merged over heads;
        ``queries`` ([H, N, d], learned) replaces the queries projected from x.

        ``doc_starts`` ([B, T] bool) restarts the memory at every marked token: M_0, zero momentum,
        an empty conv tail, chunks counted from the document's start; ``prefix`` ([1, P, D], the
        persistent tokens) is written first at every document start, its reads dropped. Each
        document then reads what it would read run alone (docs/memory.md, "Documents").
        ``valid`` ([B, T] bool) leaves out the tokens marked False: not written, read as 0.
        """
        if read_only:
            if doc_starts is not None or valid is not None:
                return self._retrieve_documents(x, state, queries, doc_starts, valid)
            return self._retrieve(x, state, queries)
        documents = state is not None and state.doc_pos is not None
        if doc_starts is not None or prefix is not None or valid is not None or documents:
            return self._forward_documents(x, state, doc_starts, prefix, valid)
        B, T, D = x.shape
        qkv, tail = causal_conv(
            F.linear(x, self.w_qkv), self.conv, state.conv_tail if state else None
        )
        q, k, v = (upcast(self._heads(t)) for t in F.silu(qkv).split(D, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = self._gates(x)

        if state is None or state.weights is None:
            weights, momentum = self._initial(B)
            pos, r = (state.pos if state else 0), 0
        else:
            weights, momentum, pos = state.weights, state.momentum, state.pos
            r = state.buffer[0].shape[1] if state.buffer is not None else 0
        if r != pos % self.chunk_size:
            raise RuntimeError(f"memory state at position {pos} holds {r} buffered tokens")
        if r:  # continue the partial chunk: its tokens' gradients are still at `weights`
            k, v = (torch.cat([b, t], 1) for b, t in zip(state.buffer[:2], (k, v)))
            gates = tuple(torch.cat([b, t], 1) for b, t in zip(state.buffer[2:], gates))
            q = torch.cat([q.new_zeros(q.shape[0], r, q.shape[2]), q], 1)

        with autocast_off(x.device.type):
            y, weights, momentum = memory_scan(
                weights, momentum, k, v, q, *gates, self.chunk_size, self.residual_norm,
                self.checkpoint_group, **self._backend(x),
            )  # fmt: skip
        N = k.shape[1]
        rem = N % self.chunk_size
        buffer = tuple(t[:, N - rem :] for t in (k, v, *gates)) if rem else None
        new_state = MemoryState(weights, momentum, buffer, tail, pos + T)

        y = self.out_norm(y[:, r:].to(x.dtype))
        out = self.to_out(self._merge(y, B) * F.silu(self.to_gate(x)))
        return out, new_state

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
        q, k, v = (upcast(self._heads(t)) for t in F.silu(conv).split(D, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)

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

    def _retrieve(
        self, x: Tensor, state: MemoryState | None, queries: Tensor | None
    ) -> tuple[Tensor, MemoryState]:
        """M*(q_t) at the state's chunk-start weights, no write (MAC: h = M*_{t-1}(q))."""
        B, _, D = x.shape
        if state is not None and state.buffer is not None:
            raise RuntimeError("read-only retrieval needs weights at a chunk boundary")
        tail = state.conv_tail if state else None
        if queries is None:
            qc, tail = causal_conv(F.linear(x, self.w_qkv[:D]), self.conv[:D], tail)
            q = self._heads(F.silu(qc))
        else:
            q = queries.unsqueeze(0).expand(B, *queries.shape).flatten(0, 1)
        q = F.normalize(upcast(q), dim=-1)
        weights = state.weights if state and state.weights else self._initial(B)[0]
        momentum = state.momentum if state else None
        with autocast_off(x.device.type):
            y = mlp_forward(weights, q, self.residual_norm)[0]
        pos = state.pos if state else 0
        return self._merge(y, B).to(x.dtype), MemoryState(weights, momentum, None, tail, pos)

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

    def current_weights(self, state: MemoryState) -> tuple[list[Tensor], list[Tensor]]:
        """Materialise M_t and S_t after the last written token (inspection and tests)."""
        if state.buffer is None:
            return state.weights, state.momentum
        if state.doc_pos is None:
            return self._commit(state.weights, state.momentum, state.buffer)
        # documents: rows hold different numbers of buffered tokens; commit each count apart
        r = (state.doc_pos % self.chunk_size).repeat_interleave(self.heads, 0)
        weights, momentum = list(state.weights), list(state.momentum)
        for count in r.unique().tolist():
            if count == 0:
                continue
            rows = r == count
            w, s = self._commit(
                [t[rows] for t in state.weights],
                [t[rows] for t in state.momentum],
                [t[rows, :count] for t in state.buffer],
            )
            weights = [a.index_put((rows,), b) for a, b in zip(weights, w)]
            momentum = [a.index_put((rows,), b) for a, b in zip(momentum, s)]
        return weights, momentum

    def _commit(self, weights, momentum, buffer) -> tuple[list[Tensor], list[Tensor]]:
        k, v, theta, log_eta, log_keep = buffer
        co = chunk_coeffs(*(g.permute(2, 0, 1) for g in (theta, log_eta, log_keep)))
        per_layer = [layer_coeffs(co, l) for l in range(self.depth)]
        _, w, s = chunk_step(weights, momentum, k, v, None, per_layer, self.residual_norm)
        return w, s
