"""The small-model CPU fast paths (issue 16) equal what they replace: RoPE on q and k as one
autograd node, the memory's causal conv as one node, RMSNorm as one node, and the CPU attention
for mixed Causal / Visible groups. Values and gradients in fp64, against the plain formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_train.models.attention import Causal, KeyGroup, Visible, attend
from titans_train.models.attention.rules import concat_groups, dense_mask, key_layout
from titans_train.models.layers import (
    RMSNorm,
    SelfAttention,
    apply_rope,
    rope_angles,
    rope_angles_at,
)
from titans_train.models.memory import causal_conv

F64 = torch.float64


def grads(outs, inputs, weights):
    total = sum((o * w).sum() for o, w in zip(outs, weights) if w is not None)
    return torch.autograd.grad(total, inputs, allow_unused=True)


def close(a, b, tol=1e-12):
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("positions", ["int", "tensor"])
@pytest.mark.parametrize("need_q", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2, 3), (1,), (3,), (0, 2)])
def test_rope_heads_node_equals_apply_rope(positions, need_q, used):
    torch.manual_seed(0)
    attn = SelfAttention(32, 2, 500.0).to(F64)
    x = torch.randn(3, 6, 32, dtype=F64, requires_grad=True)
    pos = 7 if positions == "int" else torch.randint(0, 40, (3, 6))
    q, k, v = (attn._split(t) for t in attn.qkv(x).chunk(3, dim=-1))
    if positions == "int":
        cos, sin = rope_angles(pos, 6, 16, 500.0, "cpu")
    else:
        cos, sin = rope_angles_at(pos, 16, 500.0)
    ref = (apply_rope(q, cos, sin), q, apply_rope(k, cos, sin), v)
    got = attn.project(x, pos) if need_q else attn.project_kv(x, pos)
    ref = ref if need_q else ref[2:]
    close(got, ref)
    assert all(t.is_contiguous() for t in got)
    w = [torch.randn_like(t) if i in used else None for i, t in enumerate(ref)]
    if all(t is None for t in w):
        w[0] = torch.randn_like(ref[0])
    params = [x, attn.qkv.weight]
    close(grads(got, params, w), grads(ref, params, w))


def conv_taps(x, weight, tail):
    """The memory's causal conv as K shifted multiply-adds under plain autograd."""
    K, T = weight.shape[-1], x.shape[1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], K - 1, x.shape[-1])
    xx = torch.cat([tail, x], dim=1)
    w = weight[:, 0].t()
    y = xx[:, :T] * w[0]
    for j in range(1, K):
        y = y + xx[:, j : j + T] * w[j]
    return y, xx[:, xx.shape[1] - (K - 1) :]


@pytest.mark.parametrize("with_tail", [False, True])
def test_causal_conv_node_equals_taps(with_tail):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
    weight = torch.randn(6, 1, 4, dtype=F64, requires_grad=True)
    tail = torch.randn(2, 3, 6, dtype=F64, requires_grad=True) if with_tail else None
    inputs = [x, weight] + ([tail] if with_tail else [])
    got, ref = causal_conv(x, weight, tail), conv_taps(x, weight, tail)
    close(got, ref)
    w = [torch.randn_like(t) for t in ref]
    close(grads(got, inputs, w), grads(ref, inputs, w))
    assert torch.autograd.gradcheck(
        lambda *t: causal_conv(t[0], t[1], (*t[2:], None)[0])[0], inputs
    )


def test_rmsnorm_node_equals_nn_rmsnorm():
    torch.manual_seed(0)
    ref, ours = nn.RMSNorm(16, eps=1e-6), RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())  # same parameters, same state dict
    x = torch.randn(3, 5, 16, requires_grad=True)
    assert torch.equal(ours(x), ref(x))  # fp32 forward: the same ops in the same order
    assert type(ours(x).grad_fn).__name__ == "_RMSNormFnBackward"
    ref64, ours64 = ref.to(F64), ours.to(F64)
    x64 = torch.randn(3, 5, 16, dtype=F64, requires_grad=True)
    w = [torch.randn(3, 5, 16, dtype=F64)]
    close(
        grads([ours64(x64)], [x64, ours64.weight], w), grads([ref64(x64)], [x64, ref64.weight], w)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: nn.RMSNorm's own path
        assert type(ours64.float()(x).grad_fn).__name__ != "_RMSNormFnBackward"
    assert type(ours.bfloat16()(x.bfloat16()).grad_fn).__name__ != "_RMSNormFnBackward"


def test_rmsnorm_node_is_cpu_only(monkeypatch):
    """Off the CPU (a GPU in production; meta here, like tests/test_device_probe.py) RMSNorm is
    nn.RMSNorm's, which is one fused kernel on CUDA: the node exists for CPU's per-op overhead."""
    import titans_train.models.layers as layers

    def refuse(*args):
        raise AssertionError("the CPU node ran off the CPU")

    monkeypatch.setattr(layers._RMSNormFn, "apply", refuse)
    norm = RMSNorm(16, eps=1e-6).to("meta")
    out = norm(torch.empty(3, 5, 16, device="meta", requires_grad=True))
    assert out.device.type == "meta" and out.shape == (3, 5, 16)


def mac_groups(pos: int, segment: int = 8):
    """MAC's key groups for one segment starting at ``pos``: persistent tokens, the memory's
    reads and the segment's keys (both Causal within the segment)."""
    torch.manual_seed(pos)
    B, H, n, d = 2, 2, segment, 4

    def t(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    q, q_nope = t(B, H, n, d), t(B, H, n, d)
    rule = Causal(q_start=pos, k_start=pos, segment=segment)
    groups = [KeyGroup(t(B, H, 3, d), t(B, H, 3, d), Visible())]
    groups += [KeyGroup(t(B, H, n, d), t(B, H, n, d), rule) for _ in range(2)]
    return q, q_nope, groups


def widened_sdpa(q, groups, q_nope):
    """The dense path for mixed groups before issue 16: q' = [q | q_nope] and SDPA."""
    qq, kk, vv = concat_groups(q, groups, q_nope)
    mask = dense_mask(key_layout(groups), q.shape[-2], q.device)
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("pos", [0, 8, 24])
def test_cpu_mixed_attention_equals_widened_sdpa(pos):
    q, q_nope, groups = mac_groups(pos)
    got = attend(q, groups, q_nope=q_nope, backend="sdpa")
    ref = widened_sdpa(q, groups, q_nope)
    close([got], [ref])
    inputs = [q, q_nope, *(t for g in groups for t in (g.k, g.v))]
    w = [torch.randn_like(ref)]
    close(grads([got], inputs, w), grads([ref], inputs, w))


def test_cpu_mixed_attention_row_with_only_persistent_keys():
    """Query 0 sees none of the Causal keys (all lie ahead of it), only the one Visible key: its
    output is that key's value, exactly, and finite everywhere."""
    torch.manual_seed(0)
    q, q_nope = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    ahead = KeyGroup(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), Causal(0, 1))
    kept = KeyGroup(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), Visible())
    out = attend(q, [kept, ahead], q_nope=q_nope, backend="sdpa")
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., 0, :], kept.v[..., 0, :])
    torch.testing.assert_close(out, widened_sdpa(q, [kept, ahead], q_nope))
