"""Chunked memory math against plain per-token loops (titans_spec.md section 9, tests 1-3)."""

import pytest
import torch
import torch.nn.functional as F
from reference import naive_memory

from titans_train.models.memory_math import segsum
from titans_train.models.memory_scan import memory_scan

pytestmark = pytest.mark.usefixtures("float64")


def make_inputs(G=3, N=37, d=4, depth=2, P=1, seed=0, zero_eta=False, zero_alpha=False):
    g = torch.Generator().manual_seed(seed)
    dims = [d] + [4 * d] * (depth - 1) + [d]
    W = [torch.randn(G, a, b, generator=g) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    S = [0.1 * torch.randn(G, a, b, generator=g) for a, b in zip(dims[:-1], dims[1:])]
    k = F.normalize(torch.randn(G, N, d, generator=g), dim=-1)
    q = F.normalize(torch.randn(G, N, d, generator=g), dim=-1)
    v = torch.randn(G, N, d, generator=g)
    theta = 0.5 * torch.rand(G, N, P, generator=g)
    eta = torch.zeros(G, N, P) if zero_eta else torch.rand(G, N, P, generator=g)
    alpha = torch.zeros(G, N, P) if zero_alpha else 0.2 * torch.rand(G, N, P, generator=g)
    return W, S, k, v, q, theta, eta, 1 - alpha


def run_scan(W, S, k, v, q, theta, eta, keep, chunk, residual_norm):
    return memory_scan(W, S, k, v, q, theta, torch.log(eta), torch.log(keep), chunk, residual_norm)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("case", ["plain", "eta0", "alpha0", "per_layer_gates", "no_resnorm"])
def test_chunked_equals_naive(depth, chunk, case):
    P = depth if case == "per_layer_gates" else 1
    W, S, k, v, q, theta, eta, keep = make_inputs(
        depth=depth, P=P, zero_eta=case == "eta0", zero_alpha=case == "alpha0"
    )
    resnorm = case != "no_resnorm"
    reads, W_end, S_end = run_scan(W, S, k, v, q, theta, eta, keep, chunk, resnorm)
    ref_reads, boundaries, _ = naive_memory(W, S, k, v, q, theta, eta, keep, chunk, resnorm)
    torch.testing.assert_close(reads, ref_reads, rtol=1e-8, atol=1e-9)
    ref_W, ref_S = boundaries[k.shape[1] // chunk]
    for a, b in zip(W_end + S_end, ref_W + ref_S):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_intermediate_boundaries_match():
    """States at every chunk boundary, by scanning prefixes of increasing length."""
    W, S, k, v, q, theta, eta, keep = make_inputs(N=20, depth=2)
    _, boundaries, _ = naive_memory(W, S, k, v, q, theta, eta, keep, 4, True)
    for c in range(1, 6):
        n = 4 * c
        _, W_c, S_c = run_scan(
            W, S, k[:, :n], v[:, :n], q[:, :n], theta[:, :n], eta[:, :n], keep[:, :n], 4, True
        )
        for a, b in zip(W_c + S_c, boundaries[c][0] + boundaries[c][1]):
            torch.testing.assert_close(a, b)


def test_linear_memory_is_delta_rule():
    """Linear memory, eta = 0, b = 1: W_t = (1-a_t) W_{t-1} + theta_t k_t^T (v_t - k_t W_{t-1}).

    With alpha = 0 this is DeltaNet with beta = theta (the 1/2 in the loss absorbs the factor 2).
    Note the forgetting multiplies only the old state, unlike Gated DeltaNet's a(I - b k k^T).
    """
    for zero_alpha in (True, False):
        W, S, k, v, q, theta, eta, keep = make_inputs(depth=1, zero_eta=True, zero_alpha=zero_alpha)
        S = [torch.zeros_like(S[0])]
        reads, W_end, _ = run_scan(W, S, k, v, q, theta, eta, keep, 1, False)
        Wt = W[0].clone()
        for t in range(k.shape[1]):
            kt, vt = k[:, t : t + 1], v[:, t : t + 1]
            Wt = keep[:, t, 0, None, None] * Wt + theta[:, t, 0, None, None] * kt.transpose(
                1, 2
            ) @ (vt - kt @ Wt)
            torch.testing.assert_close(reads[:, t : t + 1], q[:, t : t + 1] @ Wt)
        torch.testing.assert_close(W_end[0], Wt)


def test_linear_attention_closed_form():
    """eta = alpha = 0, one chunk of N: every gradient at W0, y_t = q_t (W0 + sum_{i<=t} ...)."""
    W, S, k, v, q, theta, eta, keep = make_inputs(N=12, depth=1, zero_eta=True, zero_alpha=True)
    S = [torch.zeros_like(S[0])]
    reads, _, _ = run_scan(W, S, k, v, q, theta, eta, keep, 12, False)
    err = v - k @ W[0]  # [G, N, d]
    for t in range(12):
        Wt = W[0] + (k[:, : t + 1] * theta[:, : t + 1]).transpose(1, 2) @ err[:, : t + 1]
        torch.testing.assert_close(reads[:, t], (q[:, t : t + 1] @ Wt)[:, 0])


def test_segsum_matches_loop():
    x = torch.randn(2, 7)
    x[0, 3] = float("-inf")
    out = segsum(x)
    for t in range(7):
        for j in range(7):
            want = x[:, j + 1 : t + 1].sum(-1) if j <= t else torch.full((2,), float("-inf"))
            torch.testing.assert_close(out[:, t, j], want)


def test_gradcheck_through_inner_loop():
    W, S, k, v, q, theta, eta, keep = make_inputs(G=2, N=6, d=3, depth=2)
    raw = [theta, torch.logit(eta), torch.logit(1 - keep)]
    leaves = [t.clone().requires_grad_() for t in [*W, *S, k, v, q, *raw]]

    def f(W1, W2, S1, S2, k, v, q, th, eta_logit, alpha_logit):
        y, Wn, Sn = memory_scan(
            [W1, W2],
            [S1, S2],
            k,
            v,
            q,
            th,
            F.logsigmoid(eta_logit),
            F.logsigmoid(-alpha_logit),
            4,
            True,
        )
        return y, *Wn, *Sn

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5)
