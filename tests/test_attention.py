"""Attention rules and backends against an obviously-correct per-row reference (CPU, fp64)."""

import math
import random

import pytest
import torch

from titans_train.models.attention import Causal, KeyGroup, Visible, attend, select_backend
from titans_train.models.attention import dispatch as attention
from titans_train.models.attention.merge import (
    MATH_PRIMITIVE,
    merge_attend,
    plan_pieces,
)

F64 = torch.float64
B, H, D = 2, 2, 8


def visible(rule, t, s):
    """The rule definition, written out for one (query index, key index) pair."""
    if isinstance(rule, Visible):
        return True
    qp, kp = rule.q_start + t, rule.k_start + s
    return (
        kp <= qp
        and (rule.window is None or qp - kp < rule.window)
        and (rule.segment is None or kp // rule.segment == qp // rule.segment)
    )


def naive_attend(q, groups, q_nope=None):
    """Per query row: gather the visible keys, softmax their logits, average their values."""
    rows = []
    for t in range(q.shape[2]):
        logits, values = [], []
        for g in groups:
            idx = [s for s in range(g.k.shape[2]) if visible(g.rule, t, s)]
            if idx:
                qt = (q_nope if isinstance(g.rule, Visible) else q)[:, :, t]
                keys = g.k[:, :, idx]
                logits.append((keys * qt[:, :, None]).sum(-1) / math.sqrt(q.shape[-1]))
                values.append(g.v[:, :, idx])
        if not logits:
            rows.append(q.new_zeros(B, H, groups[0].v.shape[-1]))
            continue
        p = torch.softmax(torch.cat(logits, -1), -1)
        rows.append((p[..., None] * torch.cat(values, 2)).sum(2))
    return torch.stack(rows, 2)


# name -> (number of queries, [(rule, number of keys), ...]); sizes deliberately odd.
PATTERNS = {
    "swa": (13, [(Causal(0, 0, window=4), 13)]),
    "swa_persistent": (13, [(Visible(), 3), (Causal(0, 0, window=4), 13)]),
    "full_causal": (13, [(Causal(0, 0), 13)]),
    "full_causal_persistent": (13, [(Visible(), 3), (Causal(0, 0), 13)]),
    "stream_kv_cache": (4, [(Causal(9, 0), 13)]),
    "stream_swa_cache": (3, [(Visible(), 2), (Causal(10, 5, window=4), 8)]),
    "stream_one_token": (1, [(Visible(), 2), (Causal(12, 0, window=5), 13)]),
    "mac_segment": (13, [(Visible(), 3), (Causal(0, 0, segment=5), 13),
                         (Causal(0, 0, segment=5), 13)]),
    "mac_memory_tokens": (13, [(Visible(), 3), (Visible(), 4), (Causal(0, 0, segment=5), 13)]),
    "mac_segment_stream": (6, [(Visible(), 3), (Causal(7, 7, segment=5), 6),
                               (Causal(7, 0, segment=5), 13)]),
    "window_and_segment": (9, [(Causal(4, 2, window=3, segment=5), 11)]),
    "keys_past_queries": (5, [(Causal(0, 0), 9)]),
    "empty_rows": (7, [(Causal(6, 0, window=4), 5)]),
    "visible_only": (5, [(Visible(), 6)]),
}  # fmt: skip


def make(name, dtype=F64, seed=0, grad=True):
    n_q, spec = PATTERNS[name]
    gen = torch.Generator().manual_seed(seed)

    def rnd(n):
        return torch.randn(B, H, n, D, generator=gen, dtype=dtype).requires_grad_(grad)

    q, q_nope = rnd(n_q), rnd(n_q)
    groups = [KeyGroup(rnd(s), rnd(s), rule) for rule, s in spec]
    return q, q_nope, groups


def leaves(q, q_nope, groups):
    return [q, q_nope, *(t for g in groups for t in (g.k, g.v))]


def forward_and_grads(fn, q, q_nope, groups):
    out = fn(q, groups, q_nope)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), leaves(q, q_nope, groups), allow_unused=True)
    zeros = [torch.zeros_like(x) for x in leaves(q, q_nope, groups)]
    return out, [z if g is None else g for g, z in zip(grads, zeros)]


def sdpa(q, groups, q_nope):
    return attend(q, groups, q_nope=q_nope, backend="sdpa")


def merged(q, groups, q_nope):
    return merge_attend(q, groups, q_nope, MATH_PRIMITIVE)


def flex(q, groups, q_nope):
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:
        pytest.skip(f"flex_attention does not import: {e}")
    with torch.no_grad():
        return attend(q, groups, q_nope=q_nope, backend="flex")


RUNNERS = {"sdpa": sdpa, "merge": merged, "flex": flex}


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---- rule semantics, seen through the attention weights ----


def weights(run, n_q, spec, q_start_nope=None):
    """Attention weights [B, H, T, S_total]: zero queries (uniform logits), one-hot values."""
    total = sum(s for _, s in spec)
    eye, off, groups = torch.eye(total, dtype=F64), 0, []
    for rule, s in spec:
        v = eye[off : off + s].expand(B, H, s, total)
        groups.append(KeyGroup(torch.randn(B, H, s, D, dtype=F64), v, rule))
        off += s
    zeros = torch.zeros(B, H, n_q, D, dtype=F64)
    return RUNNERS[run](zeros, groups, zeros)


@pytest.mark.parametrize("run", ["sdpa", "merge", "flex"])
@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("q_start,k_start", [(0, 0), (6, 2)])
def test_window_sees_exactly_w_keys_including_self(run, window, q_start, k_start):
    n_q = 11
    n_k = q_start + n_q - k_start  # the last key sits at the last query's position
    w = weights(run, n_q, [(Causal(q_start, k_start, window=window), n_k)])
    for t in range(n_q):
        qp = q_start + t
        seen = {k_start + s for s in range(n_k) if w[0, 0, t, s] > 0}
        assert seen == set(range(max(k_start, qp - window + 1), qp + 1))
        count = min(window, qp - k_start + 1)
        assert_close(w[:, :, t].sum(-1), torch.ones(B, H, dtype=F64))
        assert_close(w[:, :, t][w[:, :, t] > 0], torch.full((B * H * count,), 1 / count, dtype=F64))


@pytest.mark.parametrize("run", ["sdpa", "merge", "flex"])
@pytest.mark.parametrize("name", ["mac_segment", "mac_memory_tokens", "swa_persistent"])
def test_mask_structure_matches_rules(run, name):
    n_q, spec = PATTERNS[name]
    w = weights(run, n_q, spec)
    off = 0
    for rule, s in spec:
        for t in range(n_q):
            for j in range(s):
                assert bool(w[0, 0, t, off + j] > 0) == visible(rule, t, j), (rule, t, j)
        off += s
    # MAC, spelled out: h_i / token i visible to query j iff i <= j in the same segment of 5.
    if name == "mac_segment":
        for j in range(n_q):
            for i in range(n_q):
                expected = i <= j and i // 5 == j // 5
                assert bool(w[0, 0, j, 3 + i] > 0) == expected == bool(w[0, 0, j, 16 + i] > 0)
    if name == "mac_memory_tokens":
        assert bool((w[..., :7] > 0).all())  # persistent + memory tokens: fully visible


def rope(x, base=10.0):
    n, d = x.shape[-2], x.shape[-1]
    ang = torch.arange(n, dtype=F64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = ang.cos(), ang.sin()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


@pytest.mark.parametrize("run", ["sdpa", "merge", "flex"])
def test_persistent_keys_are_scored_with_q_nope(run):
    n_q, n_p = 9, 3
    q_nope = torch.randn(B, H, n_q, D, dtype=F64)
    k_p = torch.randn(B, H, n_p, D, dtype=F64)
    eye = torch.eye(n_p + n_q, dtype=F64)
    groups = [
        KeyGroup(k_p, eye[:n_p].expand(B, H, n_p, -1), Visible()),
        KeyGroup(torch.randn(B, H, n_q, D, dtype=F64), eye[n_p:].expand(B, H, n_q, -1),
                 Causal(0, 0, window=3)),
    ]  # fmt: skip
    expected = torch.softmax(q_nope @ k_p.transpose(-1, -2) / math.sqrt(D), -1)
    for q in (q_nope, rope(q_nope), torch.randn(B, H, n_q, D, dtype=F64)):
        w = RUNNERS[run](q, groups, q_nope)
        assert bool((w[..., :n_p] > 0).all())  # every query sees every persistent key
        # Relative weights among persistent keys depend only on q_nope, not on the rotated q.
        assert_close(w[..., :n_p] / w[..., :n_p].sum(-1, keepdim=True), expected)
    only = RUNNERS[run](torch.randn(B, H, n_q, D, dtype=F64), groups[:1], q_nope)
    assert_close(only[..., :n_p], expected)  # q plays no part at all


@pytest.mark.parametrize("run", ["sdpa", "merge"])
@pytest.mark.parametrize("name", ["mac_segment", "mac_memory_tokens", "swa_persistent"])
def test_causality_perturbing_token_j_changes_nothing_before_j(run, name):
    q, q_nope, groups = make(name, grad=False)
    base = RUNNERS[run](q, groups, q_nope)
    j = 7
    for g in groups:
        if isinstance(g.rule, Causal):
            g.k[:, :, j] += 1.0
            g.v[:, :, j] += 1.0
    q[:, :, j] += 1.0
    q_nope[:, :, j] += 1.0
    out = RUNNERS[run](q, groups, q_nope)
    assert_close(out[:, :, :j], base[:, :, :j])
    assert not torch.allclose(out[:, :, j], base[:, :, j])


@pytest.mark.parametrize("run", ["sdpa", "merge"])
@pytest.mark.parametrize("window,segment", [(4, None), (None, None), (None, 5), (3, 5)])
def test_streaming_equals_slice_of_full(run, window, segment):
    n, n_p = 13, 2
    q, q_nope, groups = make("swa", grad=False)
    q, q_nope = q[:, :, :n], q_nope[:, :, :n]
    k, v = groups[0].k, groups[0].v
    p = KeyGroup(torch.randn(B, H, n_p, D, dtype=F64), torch.randn(B, H, n_p, D, dtype=F64),
                 Visible())  # fmt: skip
    full = RUNNERS[run](q, [p, KeyGroup(k, v, Causal(0, 0, window, segment))], q_nope)
    for start in (1, 7, 8, 12):  # 7: mid-segment; 12: one-token generation step
        for k0 in {0, max(0, start - (window or n) + 1)}:  # whole cache, or just the window
            rule = Causal(start, k0, window, segment)
            got = RUNNERS[run](q[:, :, start:], [p, KeyGroup(k[:, :, k0:], v[:, :, k0:], rule)],
                               q_nope[:, :, start:])  # fmt: skip
            assert_close(got, full[:, :, start:])


@pytest.mark.parametrize("run", ["sdpa", "merge", "flex"])
def test_rows_without_keys_are_zero_with_finite_grads(run):
    cases = [
        (8, [(Causal(0, 5), 6)]),  # queries 0..4 precede every key
        (5, [(Causal(5, 0, segment=5), 5)]),  # every key is in the previous segment
        (4, [(Causal(0, 0), 0), (Causal(2, 0, window=2), 3)]),  # empty cache group
        (3, [(Causal(0, 0), 0)]),  # no key at all
    ]
    for n_q, spec in cases:
        grad = run != "flex"
        q = torch.randn(B, H, n_q, D, dtype=F64, requires_grad=grad)
        groups = [
            KeyGroup(torch.randn(B, H, s, D, dtype=F64, requires_grad=grad),
                     torch.randn(B, H, s, D, dtype=F64), rule)
            for rule, s in spec
        ]  # fmt: skip
        out = RUNNERS[run](q, groups, None)
        ref = naive_attend(q, groups)
        assert torch.isfinite(out).all()
        assert_close(out, ref)
        empty = [t for t in range(n_q) if not any(
            visible(r, t, s) for (r, n), _ in zip(spec, groups) for s in range(n))]  # fmt: skip
        assert empty and bool((out[:, :, empty] == 0).all())
        if run != "flex" and out.requires_grad:
            out.sum().backward()
            assert torch.isfinite(q.grad).all() and (q.grad[:, :, empty] == 0).all()
            assert all(torch.isfinite(g.k.grad).all() for g in groups if g.k.grad is not None)


# ---- backends against the reference ----


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_sdpa_matches_naive_forward_and_grads(name):
    assert_sdpa_matches_naive(name)


def assert_sdpa_matches_naive(name):
    q, q_nope, groups = make(name)
    out, grads = forward_and_grads(sdpa, q, q_nope, groups)
    ref, ref_grads = forward_and_grads(naive_attend, q, q_nope, groups)
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


@pytest.mark.parametrize("block", [1, 2, 5])
@pytest.mark.parametrize("name", [n for n, (_, spec) in PATTERNS.items() if any(
    isinstance(r, Causal) and r.window for r, _ in spec)])  # fmt: skip
def test_sdpa_window_blocks_match_naive_forward_and_grads(name, block, monkeypatch):
    """The block-local SDPA path (sliding windows over long sequences) against the reference."""
    monkeypatch.setattr(attention, "SDPA_BLOCK", block)
    assert_sdpa_matches_naive(name)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_lse_merge_matches_sdpa_forward_and_grads(name):
    q, q_nope, groups = make(name)
    out, grads = forward_and_grads(merged, q, q_nope, groups)
    ref, ref_grads = forward_and_grads(sdpa, q, q_nope, groups)
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_flex_forward_matches_sdpa(name):
    q, q_nope, groups = make(name, grad=False)
    assert_close(flex(q, groups, q_nope), sdpa(q, groups, q_nope))


def test_flex_refuses_backward_on_cpu():
    q, q_nope, groups = make("swa_persistent")
    with pytest.raises(ValueError, match="'flex'.*forward-only"):
        attend(q, groups, q_nope=q_nope, backend="flex")
    with pytest.raises(ValueError, match="'flex'.*forward-only"):  # grads through k only
        attend(q.detach(), groups, q_nope=q_nope.detach(), backend="flex")


def test_fp32_sdpa_and_merge_match_naive():
    q, q_nope, groups = make("mac_segment", dtype=torch.float32, grad=False)
    ref = naive_attend(q, groups, q_nope)
    assert_close(sdpa(q, groups, q_nope), ref, tol=1e-5)
    assert_close(merged(q, groups, q_nope), ref, tol=1e-5)


def test_merge_without_custom_backward_would_be_wrong():
    """Guards the test above: a merge that (like flash-attn's autograd) treats each block's lse
    as constant gives wrong gradients, and the comparison with SDPA detects it."""

    def naive_merge(q, groups, q_nope):
        outs, lses = [], []
        for g in groups:
            qq = q_nope if isinstance(g.rule, Visible) else q
            outs.append(merge_attend(qq, [g], qq, MATH_PRIMITIVE))  # correct block gradients
            lses.append(MATH_PRIMITIVE.forward(qq, g.k, g.v, g.rule)[1].detach())  # lse constant
        w = torch.softmax(torch.stack(lses), 0)
        return sum(w[i][..., None] * outs[i] for i in range(len(outs)))

    q, q_nope, groups = make("mac_segment")
    out, grads = forward_and_grads(naive_merge, q, q_nope, groups)
    ref, ref_grads = forward_and_grads(sdpa, q, q_nope, groups)
    assert_close(out, ref)
    assert not all(torch.allclose(g, r) for g, r in zip(grads, ref_grads))


def test_plan_pieces_reproduce_every_rule_with_flash_windows():
    assert plan_pieces(Causal(0, 0, window=5), 9, 9) == [(0, 9, 0, 9, 4, 0)]  # (W-1, 0)
    assert plan_pieces(Causal(0, 0), 9, 9) == [(0, 9, 0, 9, -1, 0)]  # flash causal
    rng = random.Random(0)
    for _ in range(300):
        window, segment = rng.choice([None, 1, 2, 4, 7]), rng.choice([None, 3, 5])
        rule = Causal(rng.randint(0, 12), rng.randint(0, 12), window, segment)
        n_q, n_k = rng.randint(1, 12), rng.randint(1, 16)
        got = [[False] * n_k for _ in range(n_q)]
        rows = set()
        for p in plan_pieces(rule, n_q, n_k):
            assert p.right >= 0 and p.left >= -1  # flash needs these (negative = unbounded)
            assert (p.left == -1) == (window is None) and (window is None or p.left < window)
            assert rows.isdisjoint(range(p.t0, p.t1))
            rows |= set(range(p.t0, p.t1))
            off = (p.s1 - p.s0) - (p.t1 - p.t0)  # flash aligns keys bottom-right
            for i in range(p.t1 - p.t0):
                for j in range(p.s1 - p.s0):
                    if (p.left < 0 or j >= i + off - p.left) and j <= i + off + p.right:
                        got[p.t0 + i][p.s0 + j] = True
        want = [[visible(rule, t, s) for s in range(n_k)] for t in range(n_q)]
        assert got == want, (rule, n_q, n_k)


# The flash adapter is checked against an independent model of flash-attn's contract in
# tests/test_flash_contract.py (the old stand-ins here reused our own band kernel).


# ---- backend selection ----


def test_select_backend_on_cpu():
    q = torch.randn(1, 1, 4, D)
    assert select_backend(q) == "sdpa"
    assert select_backend(q.bfloat16()) == "sdpa"
    assert select_backend(q, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="'flash'.*CUDA"):
        select_backend(q, "flash")
    with pytest.raises(ValueError, match="'flash'.*CUDA"):
        attend(q, [KeyGroup(q, q, Causal(0, 0))], backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend(q, "xformers")
    with pytest.raises(ValueError, match="'flex'.*forward-only"):
        select_backend(q.requires_grad_(), "flex")


def test_visible_group_requires_q_nope():
    q, _, groups = make("swa_persistent", grad=False)
    with pytest.raises(ValueError, match="q_nope"):
        attend(q, groups)


# ---- flex: one compiled graph across MAC segments ----


def test_flex_compiles_once_across_mac_segments():
    """MAC attends segment by segment with absolute positions. A mask over absolute positions is
    a new dynamo guard per segment (and flex falls back to eager after recompile_limit graphs);
    masks over segment-relative positions compile once for all full segments."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch._dynamo

    from titans_train.models.attention.flex import flex_attend
    from titans_train.models.attention.rules import key_layout

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    C, n_p = 8, 3
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        pos = i * C
        q, q_nope = (torch.randn(B, H, C, D, generator=gen) for _ in range(2))
        groups = [KeyGroup(torch.randn(B, H, n_p, D), torch.randn(B, H, n_p, D), Visible())]
        for _ in range(2):  # h and the segment, both causal within the segment
            kv = (torch.randn(B, H, C, D, generator=gen) for _ in range(2))
            groups.append(KeyGroup(*kv, Causal(q_start=pos, k_start=pos, segment=C)))
        out = flex_attend(q, groups, q_nope, key_layout(groups), compile_backend=counting_backend)
        assert_close(out, sdpa(q, groups, q_nope), tol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 10 MAC segments of one layout"
