"""NeuralMemory: the Titans long-term memory (LMM) as a token mixer, with explicit streaming state.

DESIGN decisions 1-7: per-token data-dependent gates, q/k/v = l2(SiLU(causal depthwise conv(W x))),
a per-head MLP memory with learned initial weights M_0, chunked training with gradients at the
chunk-start weights, reads after the token's own write, output W_o(RMSNorm(y) * SiLU(W_g x)).

The module owns every parameter it uses and uses them only inside its own ``forward`` (no vmap,
no calls into sub-module weights from outside), so DeepSpeed ZeRO-3 can gather them with its hooks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import RMSNorm
from .memory_documents import DocumentsMixin
from .memory_math import chunk_coeffs, chunk_step, layer_coeffs, mlp_forward
from .memory_scan import autocast_off, memory_scan
from .memory_state import MemoryState, upcast
from .policy import no_weight_decay, residual_proj
from .runtime import RuntimeConfig, resolve_memory_backend


def causal_conv(x: Tensor, weight: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over time. x: [B, T, C], weight: [C, 1, K], tail: [B, K-1, C].

    Written as K shifted multiply-adds: on CPU this is ~40x faster in backward than the
    depthwise conv1d kernel, and it is exact.
    """
    K = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], K - 1, x.shape[-1])
    xx = torch.cat([tail.to(x.dtype), x], dim=1)
    w = weight[:, 0].t().to(x.dtype)  # [K, C]
    return _ShiftedTaps.apply(xx, w), xx[:, xx.shape[1] - (K - 1) :]


class _ShiftedTaps(torch.autograd.Function):
    """y[:, t] = sum_j xx[:, t + j] * w[j] for xx [B, T + K - 1, C], w [K, C]: one node whose
    backward adds the K shifted gradients into one buffer, instead of K slice backwards that
    each zero-fill a full-size gradient (issue 16)."""

    @staticmethod
    def forward(ctx, xx: Tensor, w: Tensor) -> Tensor:
        K = w.shape[0]
        T = xx.shape[1] - K + 1
        y = xx[:, :T] * w[0]
        for j in range(1, K):
            y.addcmul_(xx[:, j : j + T], w[j])
        ctx.save_for_backward(xx, w)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        xx, w = ctx.saved_tensors
        (B, S, C), K = xx.shape, w.shape[0]
        T = S - K + 1
        dxx = dw = None
        if ctx.needs_input_grad[0]:
            dxx = xx.new_zeros(xx.shape)
            for j in range(K):
                dxx[:, j : j + T].addcmul_(g, w[j])
        if ctx.needs_input_grad[1]:  # windows [B, K, T, C] of xx as a view, one product
            b, s, c = xx.stride()
            windows = xx.as_strided((B, K, T, C), (b, s, s, c), xx.storage_offset())
            dw = (windows * g[:, None]).sum((0, 2))
        return dxx, dw


class NeuralMemory(DocumentsMixin, nn.Module):
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
        one_thread_loops: bool = True,
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
        # False: keep every chunk's state this call (no checkpointing), whatever checkpoint_group
        # says; set per call by TitansLM.forward from the sequence's size (``checkpointing``).
        self.checkpoint_active: bool | None = None
        self._state_itemsize = 4
        self.backend = backend  # eager | compile | triton | auto (resolved per device and call)
        self.one_thread_loops = one_thread_loops  # runtime.cpu_threads == "auto"
        self.n_gates = depth if per_layer_gates else 1
        d = self.head_dim
        # Owned directly (not nn.Linear) so read-only calls can use the q rows alone under ZeRO-3.
        self.w_qkv = nn.Parameter(torch.empty(3 * dim, dim))
        self.conv = nn.Parameter(torch.empty(3 * dim, 1, conv_kernel))
        self.to_gates = nn.Linear(dim, 3 * heads * self.n_gates)  # theta, eta, alpha per head
        dims = [d] + [expansion * d] * (depth - 1) + [d]
        self.layer_dims = dims  # as ints: under ZeRO-3 a parameter's shape is 0 outside forward
        self.init_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(heads, a, b)) for a, b in zip(dims[:-1], dims[1:])]
        )
        no_weight_decay(self.init_weights, *(str(i) for i in range(depth)))  # M_0: a state
        self.out_norm = RMSNorm(d, eps=1e-6)
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

    @property
    def checkpoint_group(self) -> int:
        """Chunks per checkpoint group for this call: 0 when ``checkpoint_active`` is False."""
        return 0 if self.checkpoint_active is False else self._checkpoint_group

    @checkpoint_group.setter
    def checkpoint_group(self, value: int) -> None:
        self._checkpoint_group = value

    def chunk_state_bytes(self, batch: int, tokens: int) -> int:
        """Bytes a training forward over ``tokens`` tokens keeps for backward when it does not
        checkpoint: per chunk, M and S of every layer and the chunk's intermediates (the memory
        on the keys, its errors, the reads: ``memory_group.scan_group``)."""
        dims = self.layer_dims  # not the parameters: TitansLM.forward calls this before ZeRO-3
        n, L = self.chunk_size, self.depth  # has gathered them (their shapes are 0 there)
        hidden, ins, outs = sum(dims[1:-1]), sum(dims[:-1]), sum(dims[1:])
        per_token = 3 * hidden + 2 * outs + ins + 3 * outs + 2 * n * L
        per_token += 2 * dims[-1] + 2 if self.residual_norm else 0
        per_chunk = 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])) + n * per_token
        # The inner loop's element size, fp32 at least, as the last forward saw it (4 before
        # one): reading a parameter here, before its module's forward, broke ZeRO-3's backward.
        size = self._state_itemsize
        return batch * self.heads * per_chunk * size * -(-tokens // n)

    # -- helpers -----------------------------------------------------------------------------
    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, H*d] -> [B*H, T, d]"""
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2).reshape(B * self.heads, T, -1)

    def _qkv_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The conv's output [B, T, 3*H*d] -> (q, k l2-normalised, v), each [B*H, T, d], fp32 at
        least: one copy into head layout and one normalize for q and k together."""
        B, T, _ = qkv.shape
        heads = F.silu(qkv).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        qk, v = upcast(heads.reshape(3, B * self.heads, T, -1)).split([2, 1])
        q, k = F.normalize(qk, dim=-1).unbind(0)
        return q, k, v[0]

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
        self._state_itemsize = max(4, self.init_weights[0].element_size())  # chunk_state_bytes
        backend = resolve_memory_backend(self.backend, x.device, self.layer_dims, self.chunk_size)
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
        q, k, v = self._qkv_heads(qkv)
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
                self.checkpoint_group, **self._backend(x), one_thread_loops=self.one_thread_loops,
            )  # fmt: skip
        N = k.shape[1]
        rem = N % self.chunk_size
        buffer = tuple(t[:, N - rem :] for t in (k, v, *gates)) if rem else None
        new_state = MemoryState(weights, momentum, buffer, tail, pos + T)

        y = self.out_norm(y[:, r:].to(x.dtype))
        out = self.to_out(self._merge(y, B) * F.silu(self.to_gate(x)))
        return out, new_state

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
