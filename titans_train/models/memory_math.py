"""Pure functions for the chunked inner loop of the Titans neural memory.

Paper: Behrouz et al., "Titans", eqs. 12-14 (surprise, momentum, forgetting) and 16-17 (chunked
parallel training). Everything is batched over G = batch x heads groups; each group has its own
memory. Conventions (docs/memory.md):

- The memory is an MLP with weights W_l: [G, d_{l-1}, d_l], l = 1..L. Hidden layers use GELU; with
  ``residual_norm`` the output is ``x + LayerNorm(z_L)`` (parameter-free LayerNorm).
- The inner loss is 1/2 ||M(k) - v||^2, summed over features.
- Inside a chunk every token's gradient u_i is taken at the chunk-start weights M0 (DESIGN 1).
- Gates arrive as theta_i >= 0, log(eta_i) and log(1 - alpha_i), shape [G, n, P] with P = 1 (shared
  by all memory layers) or P = L (one gate per layer).
- Recurrence (eqs. 13-14): S_t = eta_t S_{t-1} - theta_t u_t ; M_t = (1 - alpha_t) M_{t-1} + S_t.

Within a chunk this unrolls to (t, i index tokens of the chunk, 1-based):
    S_t = E_t0 S0 - sum_{i<=t} theta_i E_ti u_i
    M_t = B_t0 M0 + c_t S0 - sum_{i<=t} C_ti theta_i u_i,     C = Bm @ Em,  c = Bm @ E_.0
with Em[t,i] = prod_{j=i+1..t} eta_j and Bm[t,j] = prod_{m=j+1..t} (1 - alpha_m), computed from
segment sums of the log gates (no cumulative-product division, so eta = 0 or alpha = 1 are exact).
Per-token gradients are never materialised: u_i = a_{i}^T delta_i, so both the chunk-end update and
the per-token reads (the dual form) are batched matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5


def layer_norm(z: Tensor) -> Tensor:
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS)


def layer_norm_backward(z: Tensor, g: Tensor) -> Tensor:
    """Gradient through a parameter-free LayerNorm over the last dim, given dL/d LN(z) = g.

    aten's own kernels (2 ops instead of ~14 elementwise ones); autograd differentiates
    native_layer_norm_backward with its double-backward formula (the outer gradient)."""
    shape = z.shape[-1:]
    _, mean, rstd = torch.native_layer_norm(z, shape, None, None, LN_EPS)
    return torch.ops.aten.native_layer_norm_backward(
        g, z, shape, mean, rstd, None, None, [True, False, False]
    )[0]


def mlp_forward(weights: list[Tensor], x: Tensor, residual_norm: bool) -> tuple[Tensor, list, list]:
    """Memory forward: (output, layer inputs a_0..a_{L-1}, pre-activations z_1..z_L)."""
    acts, pres = [x], []
    h = x
    for l, w in enumerate(weights):
        z = torch.bmm(h, w)
        pres.append(z)
        if l < len(weights) - 1:
            h = F.gelu(z)
            acts.append(h)
    out = x + layer_norm(pres[-1]) if residual_norm else pres[-1]
    return out, acts, pres


def mlp_deltas(
    weights: list[Tensor], pres: list[Tensor], grad_out: Tensor, residual_norm: bool
) -> list[Tensor]:
    """Back-propagated errors delta_l = dL/dz_l for every layer (per token, batched)."""
    delta = layer_norm_backward(pres[-1], grad_out) if residual_norm else grad_out
    deltas = [delta]
    for l in range(len(weights) - 1, 0, -1):
        # aten's gelu_backward is (grad * GELU'(z)) in one op, with a double-backward formula
        # for the outer gradient; it replaced five elementwise ops and their backward nodes.
        delta = torch.ops.aten.gelu_backward(
            torch.bmm(delta, weights[l].transpose(-1, -2)), pres[l - 1]
        )
        deltas.append(delta)
    return deltas[::-1]


_MASKS: dict = {}


def _segsum_masks(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(j >= t, j > t) as bool [n, n], built once per (n, device): rebuilding them cost 6 of the
    ~11 ops of every segsum, and segsum runs twice per memory call."""
    key = (n, str(device))
    if key not in _MASKS:
        with torch.inference_mode(False), torch.no_grad():
            ones = torch.ones(n, n, dtype=torch.bool, device=device)
            masks = (~ones.tril(-1), ~ones.tril(0))
        if all(type(m) is torch.Tensor for m in masks):  # never cache a mode's tensor subclass
            _MASKS[key] = masks
        return masks
    return _MASKS[key]


def segsum(x: Tensor) -> Tensor:
    """out[..., t, j] = sum_{m=j+1..t} x[..., m] for j <= t, and -inf for j > t.

    Built by masked cumulative sums rather than differences of one cumsum, so -inf entries
    (eta = 0 or alpha = 1) stay exact instead of producing inf - inf.
    """
    n = x.shape[-1]
    not_strict, not_incl = _segsum_masks(n, x.device)
    xx = x.unsqueeze(-1).expand(*x.shape, n)  # [..., m, j]
    out = xx.masked_fill(not_strict, 0.0).cumsum(-2)
    return out.masked_fill(not_incl, float("-inf"))


@dataclass
class ChunkCoeffs:
    """Decay coefficients of one or more chunks; leading dims [P, G, ...chunks], then n / n x n."""

    b0: Tensor  # B_t0 = prod_{m<=t} (1 - alpha_m)                          [..., n]
    e0: Tensor  # E_t0 = prod_{m<=t} eta_m                                  [..., n]
    c0: Tensor  # c_t  = sum_{j<=t} B_tj E_j0  (momentum carried into M_t)  [..., n]
    c_theta: Tensor  # C_ti theta_i, lower triangular                       [..., n, n]
    e_theta: Tensor  # E_ti theta_i, lower triangular                       [..., n, n]


def chunk_coeffs(theta: Tensor, log_eta: Tensor, log_keep: Tensor) -> ChunkCoeffs:
    """Coefficients for chunks laid out on the last axis: gates [..., n] -> ChunkCoeffs."""
    b_mat = torch.exp(segsum(log_keep))  # Bm[t, j]
    e_mat = torch.exp(segsum(log_eta))  # Em[t, i]
    e0 = torch.exp(torch.cumsum(log_eta, -1))
    b0 = torch.exp(torch.cumsum(log_keep, -1))
    c0 = (b_mat @ e0.unsqueeze(-1)).squeeze(-1)
    c_theta = (b_mat @ e_mat) * theta.unsqueeze(-2)
    e_theta = e_mat * theta.unsqueeze(-2)
    return ChunkCoeffs(b0=b0, e0=e0, c0=c0, c_theta=c_theta, e_theta=e_theta)


def layer_coeffs(co: ChunkCoeffs, layer: int, *index) -> ChunkCoeffs:
    """Coefficients of one memory layer (gates shared by all layers when P = 1), indexed further."""
    p = min(layer, co.b0.shape[0] - 1)
    return ChunkCoeffs(
        *(getattr(co, f)[(p, *index)] for f in ("b0", "e0", "c0", "c_theta", "e_theta"))
    )


def chunk_step(
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor | None,
    coeffs: list[ChunkCoeffs],
    residual_norm: bool,
    commit: bool = True,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """One chunk of n tokens. ``coeffs[l]`` holds layer l's [G, n(, n)] coefficients.

    Returns (per-token reads of M_t at q_t, or None; weights and momentum after the chunk). The
    reads see the token's own write (DESIGN 2). With ``commit=False`` the state is returned as is.
    """
    out, acts, pres = mlp_forward(weights, k, residual_norm)
    deltas = mlp_deltas(weights, pres, out - v, residual_norm)

    y = None
    if q is not None:
        # Dual form, layer by layer:
        #   z_t = h_t [B_t0 W + c_t S] - sum_{i<=t} C_ti theta_i (h_t . a_i) delta_i
        h = q
        for l, (w, s, a, d, co) in enumerate(zip(weights, momentum, acts, deltas, coeffs)):
            z = co.b0.unsqueeze(-1) * torch.bmm(h, w) + co.c0.unsqueeze(-1) * torch.bmm(h, s)
            z = z - torch.bmm(co.c_theta * torch.bmm(h, a.transpose(-1, -2)), d)
            h = F.gelu(z) if l < len(weights) - 1 else z
        y = q + layer_norm(h) if residual_norm else h

    if not commit:
        return y, weights, momentum
    new_w, new_s = [], []
    for w, s, a, d, co in zip(weights, momentum, acts, deltas, coeffs):
        at = a.transpose(-1, -2)
        new_w.append(
            co.b0[..., -1, None, None] * w
            + co.c0[..., -1, None, None] * s
            - torch.bmm(at, co.c_theta[..., -1, :].unsqueeze(-1) * d)
        )
        new_s.append(
            co.e0[..., -1, None, None] * s - torch.bmm(at, co.e_theta[..., -1, :].unsqueeze(-1) * d)
        )
    return y, new_w, new_s


_COMPILED_STEP = None


def compiled_chunk_step():
    """``chunk_step`` under torch.compile, built once. Only full chunks use it (fixed shapes, so
    one graph); fusing its ~100 small ops per chunk makes the inner loop ~2.5x faster on CPU."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(chunk_step, dynamic=False)
    return _COMPILED_STEP


COEFF_FIELDS = tuple(ChunkCoeffs.__dataclass_fields__)


def span_coeffs(theta: Tensor, log_eta: Tensor, log_keep: Tensor, chunk: int) -> list[Tensor]:
    """Coefficients of every whole chunk of a span, in one batch: gates [G, N, P] (N a multiple
    of ``chunk``) -> the ChunkCoeffs fields as tensors [P, G, chunks, n(, n)]."""
    G, N, _ = theta.shape

    def fold(x: Tensor) -> Tensor:  # [G, N, P] -> [P, G, chunks, b]
        return x.reshape(G, N // chunk, chunk, -1).permute(3, 0, 1, 2)

    co = chunk_coeffs(fold(theta), fold(log_eta), fold(log_keep))
    return [getattr(co, f) for f in COEFF_FIELDS]


@dataclass
class DocFlags:
    """Document boundaries of a span, per group and chunk (docs/memory.md, "Documents").

    ``reset[g, c]``: before chunk c, group g's memory restarts at M_0 (``init``) with zero momentum,
    because a document starts at the chunk's first token. ``commit[g, c]`` False: the chunk is not
    committed (it holds a document's unfinished tail or padding) and the state stays as it was
    before it. Chunks are counted over the whole span, a trailing partial chunk included
    (never committed). A kernel gets the same two bits per (group, chunk).
    """

    init: list[Tensor]  # M_0 per memory layer, [G, d_in, d_out]
    reset: Tensor  # bool [G, chunks]
    commit: Tensor  # bool [G, chunks]

    def chunks(self, start: int, stop: int) -> DocFlags:
        return DocFlags(self.init, self.reset[:, start:stop], self.commit[:, start:stop])


def apply_reset(
    weights: list[Tensor], momentum: list[Tensor], flags: DocFlags, c: int
) -> tuple[list[Tensor], list[Tensor]]:
    """M and S before chunk c: M_0 and 0 where a document starts there (torch.where, so no
    gradient reaches the previous document's state through a reset)."""
    r = flags.reset[:, c, None, None]
    weights = [torch.where(r, w0, w) for w0, w in zip(flags.init, weights)]
    momentum = [torch.where(r, torch.zeros_like(s), s) for s in momentum]
    return weights, momentum


def scan_chunks(
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor | None,
    coeffs: list[Tensor],
    chunk: int,
    residual_norm: bool,
    compiled: bool = False,
    flags: DocFlags | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """Whole chunks (N a multiple of ``chunk``), committed one after the other; ``coeffs`` from
    ``span_coeffs`` (computed once per call, outside any checkpoint group, so the recompute in
    backward does not redo them). ``flags``: document resets and commits per chunk.

    Chunks and gate layers are split off with unbind, not indexing, so autograd stacks their
    gradients once instead of zero-filling a full-size tensor per chunk (quadratic in N).
    """
    step = compiled_chunk_step() if compiled else chunk_step
    if compiled and torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        # A fresh state's zero momentum does not require grad, the next chunk's does: dynamo
        # guards on requires_grad, so that would compile (and code-generate) a second graph.
        momentum = [s if s.requires_grad else s.detach().requires_grad_() for s in momentum]
    G, N, _ = k.shape
    n = N // chunk

    def split(x: Tensor | None) -> list:
        return [None] * n if x is None else list(x.reshape(G, n, chunk, -1).unbind(1))

    # per_gate[p][c]: chunk c's coefficients for gate set p (one set shared by all layers if P = 1)
    per_gate = [
        [ChunkCoeffs(*f) for f in zip(*(t.unbind(1) for t in fields))]
        for fields in zip(*(t.unbind(0) for t in coeffs))
    ]
    # Which chunks need a select at all, read once: a select copies every weight, and most
    # chunks neither start a document nor hold an uncommitted tail.
    resets = [False] * n if flags is None else flags.reset.any(0).tolist()
    holds = [False] * n if flags is None else (~flags.commit).any(0).tolist()
    reads = []
    for c, (kc, vc, qc) in enumerate(zip(split(k), split(v), split(q))):
        layers = [per_gate[min(l, len(per_gate) - 1)][c] for l in range(len(weights))]
        if resets[c]:
            weights, momentum = apply_reset(weights, momentum, flags, c)
        y, new_w, new_s = step(weights, momentum, kc, vc, qc, layers, residual_norm)
        if holds[c]:
            keep = flags.commit[:, c, None, None]
            new_w = [torch.where(keep, a, b) for a, b in zip(new_w, weights)]
            new_s = [torch.where(keep, a, b) for a, b in zip(new_s, momentum)]
        weights, momentum = new_w, new_s
        reads.append(y)
    return (None if q is None else torch.cat(reads, dim=1)), weights, momentum
