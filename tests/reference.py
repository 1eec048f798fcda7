"""Plain, obviously correct reference implementations used by the tests."""

import torch
import torch.nn.functional as F


def ref_mlp(weights, x, residual_norm):
    h = x
    for l, w in enumerate(weights):
        h = h @ w
        if l < len(weights) - 1:
            h = F.gelu(h)
    return x + F.layer_norm(h, h.shape[-1:], eps=1e-5) if residual_norm else h


def naive_memory(weights, momentum, k, v, q, theta, eta, keep, chunk, residual_norm):
    """Eqs. 13-14 token by token; the gradient is taken by autograd at the chunk-start weights.

    Returns per-token reads of M_t (after token t's write), the states at every chunk boundary,
    and the state (M_t, S_t) after every token.
    """
    W = [w.clone() for w in weights]
    S = [s.clone() for s in momentum]
    G, N, _ = k.shape
    P = theta.shape[-1]
    per_token = []
    reads, boundaries = [], [([w.clone() for w in W], [s.clone() for s in S])]
    for t in range(N):
        if t % chunk == 0:
            base = [w.detach().clone().requires_grad_() for w in W]
        out = ref_mlp(base, k[:, t : t + 1], residual_norm)
        loss = 0.5 * ((out - v[:, t : t + 1]) ** 2).sum()
        grads = torch.autograd.grad(loss, base)
        for l in range(len(W)):
            p = min(l, P - 1)
            th, et, kp = (x[:, t, p, None, None] for x in (theta, eta, keep))
            S[l] = et * S[l] - th * grads[l]
            W[l] = kp * W[l] + S[l]
        reads.append(ref_mlp(W, q[:, t : t + 1], residual_norm))
        per_token.append(([w.clone() for w in W], [s.clone() for s in S]))
        if (t + 1) % chunk == 0:
            boundaries.append(([w.clone() for w in W], [s.clone() for s in S]))
    return torch.cat(reads, 1), boundaries, per_token
