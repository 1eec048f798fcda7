"""Packed documents in attention (issue 13, attention side): DocCausal in every backend against
an explicit per-row reference, exactness of a packed document against the document alone, and
per-row RoPE positions (CPU, fp64)."""

import pytest
import torch
from doc_helpers import (
    CASES,
    F64,
    ROWS,
    D,
    H,
    forward_and_grads,
    irregular,
    layout,
    make,
    naive_attend,
)

from titans_train.models.attention import (
    Causal,
    DocCausal,
    KeyGroup,
    Visible,
    attend,
    document_positions,
)
from titans_train.models.attention import dispatch as attention
from titans_train.models.attention.documents import MATH_DOC_PRIMITIVE, doc_bands
from titans_train.models.attention.merge import merge_attend
from titans_train.models.layers import apply_rope, rope_angles, rope_angles_at


def sdpa(q, groups, q_nope):
    return attend(q, groups, q_nope=q_nope, backend="sdpa")


def merged(q, groups, q_nope):
    return merge_attend(q, groups, q_nope, MATH_DOC_PRIMITIVE)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("run", ["sdpa", "merge"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_naive_forward_and_grads(run, case):
    args = make(**CASES[case])
    out, grads = forward_and_grads({"sdpa": sdpa, "merge": merged}[run], *args)
    ref, ref_grads = forward_and_grads(naive_attend, *args)
    close(out, ref)
    for g, r in zip(grads, ref_grads):
        close(g, r)


@pytest.mark.parametrize("block", [1, 5])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sdpa_blocks_match_naive(case, block, monkeypatch):
    """DocCausal takes the block-local path with or without a window (a block reaches only its
    own documents)."""
    monkeypatch.setattr(attention, "SDPA_BLOCK", block)
    args = make(**CASES[case])
    out, grads = forward_and_grads(sdpa, *args)
    ref, ref_grads = forward_and_grads(naive_attend, *args)
    close(out, ref)
    for g, r in zip(grads, ref_grads):
        close(g, r)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_flex_forward_matches_naive(case):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, q_nope, groups = make(**CASES[case])
    q, q_nope = q.detach(), q_nope.detach()  # flex has no backward on CPU
    groups = [KeyGroup(g.k.detach(), g.v.detach(), g.rule) for g in groups]
    with torch.no_grad():
        out = attend(q, groups, q_nope=q_nope, backend="flex")
        close(out, naive_attend(q, groups, q_nope))


# ---- exactness: a document inside a packed row equals the document alone ----


def exact_run(backend, monkeypatch):
    if backend == "blocks":
        monkeypatch.setattr(attention, "SDPA_BLOCK", 4)
        return lambda q, groups, q_nope: attend(q, groups, q_nope=q_nope, backend="sdpa")
    if backend == "merge":
        return merged
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
        return lambda q, groups, q_nope: attend(q, groups, q_nope=q_nope, backend="flex")
    return sdpa


EXACT_ROWS = [[(0, 0, 6), (1, 0, 9)], [(2, 0, 4), (-1, 0, 1), (3, 0, 10)]]


def rows_of(run, grad, q, k, v, prefix, rule, cos, sin, b, sl):
    """Output rows (b, sl) of attention over raw q, k, v rotated by (cos, sin), and the
    gradients of a fixed weighting of those rows w.r.t. the raw q, k, v."""
    q, k, v = (x.clone().requires_grad_(grad) for x in (q, k, v))
    pk, pv = (x.expand(q.shape[0], -1, -1, -1) for x in prefix)
    groups = [KeyGroup(pk, pv, Visible()), KeyGroup(apply_rope(k, cos, sin), v, rule)]
    out = run(apply_rope(q, cos, sin), groups, q)[b : b + 1, :, sl]
    if not grad:
        return out, []
    w = torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)
    return out, torch.autograd.grad((out * w).sum(), (q, k, v))


@pytest.mark.parametrize("backend", ["sdpa", "blocks", "merge", "flex"])
@pytest.mark.parametrize("window,segment", [(None, None), (3, None), (None, 4), (5, 3)])
def test_packed_document_equals_document_alone(backend, window, segment, monkeypatch):
    """Raw (unrotated) q, k, v of a packed batch, RoPE at per-row document positions: each
    document's rows equal the same document attended alone from position 0 (fp64, 1e-10), and
    so do the gradients, which are exactly 0 outside the document (flex: forward only)."""
    run, grad = exact_run(backend, monkeypatch), backend != "flex"
    doc, pos = layout(EXACT_ROWS)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, H, 15, D, generator=gen, dtype=F64) for _ in range(3))
    prefix = [torch.randn(1, H, 2, D, generator=gen, dtype=F64) for _ in range(2)]
    cos, sin = rope_angles_at(pos, D, 10.0)
    packed = DocCausal(doc, pos, doc, pos, window, segment)
    for b, row in enumerate(EXACT_ROWS):
        start = 0
        for d, _, n in row:
            sl, start = slice(start, start + n), start + n
            if d == -1:
                continue
            got, got_grads = rows_of(run, grad, q, k, v, prefix, packed, cos, sin, b, sl)
            one = [x[b : b + 1, :, sl] for x in (q, k, v)]
            cos1, sin1 = rope_angles(0, n, D, 10.0, "cpu")
            alone = Causal(0, 0, window, segment)
            want, want_grads = rows_of(run, grad, *one, prefix, alone, cos1, sin1, 0, slice(None))
            close(got, want)
            for g, w in zip(got_grads, want_grads):
                close(g[b : b + 1, :, sl], w)
                rest = torch.ones_like(g, dtype=torch.bool)
                rest[b, :, sl] = False
                assert bool((g[rest] == 0).all())  # nothing flows to other documents


def test_rope_angles_at_equals_rope_angles_for_consecutive_positions():
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = rope_angles_at(pos, 8, 500.0)
    assert cos.shape == (2, 1, 5, 4) and cos.dtype == torch.float32
    for b, p0 in enumerate((0, 7)):
        c, s = rope_angles(p0, 5, 8, 500.0, "cpu")
        assert torch.equal(cos[b, 0], c) and torch.equal(sin[b, 0], s)  # bitwise
    x = torch.randn(2, 3, 5, 8, dtype=F64)
    c, s = rope_angles(7, 5, 8, 500.0, "cpu")
    assert torch.equal(apply_rope(x, cos, sin)[1], apply_rope(x[1:], c, s)[0])


def test_rope_angles_at_rejects_float_or_wrong_rank_positions():
    with pytest.raises(ValueError, match="pos must be an integer tensor"):
        rope_angles_at(torch.zeros(2, 3), 8, 10.0)
    with pytest.raises(ValueError, match="pos must be an integer tensor"):
        rope_angles_at(torch.zeros(3, dtype=torch.int64), 8, 10.0)


# ---- structure, errors ----


def test_padding_queries_without_prefix_give_zero_and_finite_grads():
    q, q_nope, groups = make(prefix=False, cache=False)
    for run in (sdpa, merged):
        out, grads = forward_and_grads(run, q, q_nope, groups)
        assert bool((out[1, :, 3:5] == 0).all())  # row 1 positions 3, 4 are padding
        assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_doc_bands_one_band_per_document_and_segment():
    doc, pos = layout(ROWS)
    bands = doc_bands(DocCausal(doc, pos, doc, pos, window=4))
    assert [(x.b, x.t0, x.t1, x.left, x.right) for x in bands] == [
        (0, 0, 4, 3, 0), (0, 4, 11, 3, 0), (0, 11, 16, 3, 0), (1, 0, 3, 3, 0), (1, 5, 16, 3, 0),
    ]  # fmt: skip
    seg = doc_bands(DocCausal(doc, pos, doc, pos, segment=4))
    # row 0 doc 0 sits at positions 10..13: segments [10, 11] and [12, 13]
    assert [(x.t0, x.t1, x.s0, x.s1) for x in seg if x.b == 0][:2] == [(0, 2, 0, 2), (2, 4, 2, 4)]


BAD = {
    "q_doc float": (lambda d, p: dict(q_doc=d.float()), "DocCausal.q_doc must be an int64"),
    "k_pos rank": (lambda d, p: dict(k_pos=p[0]), "DocCausal.k_pos must be an int64"),
    "q_pos shape": (lambda d, p: dict(q_pos=p[:, :5]), "DocCausal.q_pos must have q_doc's shape"),
    "k_doc batch": (lambda d, p: dict(k_doc=d[:1], k_pos=p[:1]), "DocCausal.k_doc has batch"),
    "window": (lambda d, p: dict(window=0), "DocCausal.window must be >= 1"),
    "segment": (lambda d, p: dict(segment=0), "DocCausal.segment must be >= 1"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_doc_causal_names_the_tensor(name):
    doc, pos = layout(ROWS)
    change, message = BAD[name]
    kw = dict(q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos) | change(doc, pos)
    with pytest.raises(ValueError, match=message):
        DocCausal(**kw)


def test_attend_checks_doc_tensors_against_q_and_keys():
    q, q_nope, groups = make(prefix=False, cache=False)
    doc, pos = layout(ROWS)
    short = DocCausal(doc[:, :-1], pos[:, :-1], doc, pos)
    with pytest.raises(ValueError, match=r"group 0: DocCausal.q_doc must be \[2, 16\]"):
        attend(q, [KeyGroup(groups[0].k, groups[0].v, short)], backend="sdpa")
    few = DocCausal(doc, pos, doc[:, :-1], pos[:, :-1])
    with pytest.raises(ValueError, match=r"group 0: DocCausal.k_doc must be \[2, 16\]"):
        attend(q, [KeyGroup(groups[0].k, groups[0].v, few)], backend="sdpa")


@pytest.mark.parametrize("seed", range(3))
def test_irregular_layouts_match_naive_on_every_path(seed, monkeypatch):
    """Document ids out of order, repeated runs of one document, gaps in positions, keys longer
    than queries: the block-local key spans, the varlen bands and flex stay exact."""
    q, q_nope, groups = irregular(seed)
    ref, ref_grads = forward_and_grads(naive_attend, q, q_nope, groups)
    monkeypatch.setattr(attention, "SDPA_BLOCK", 3)
    for run in (sdpa, merged):
        out, grads = forward_and_grads(run, q, q_nope, groups)
        close(out, ref)
        for g, r in zip(grads, ref_grads):
            close(g, r)
    if flex_imports():
        detached = [KeyGroup(g.k.detach(), g.v.detach(), g.rule) for g in groups]
        out = attend(q.detach(), detached, q_nope=q_nope.detach(), backend="flex")
        close(out, ref.detach())


def flex_imports() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def test_flex_compiles_once_across_batches_of_documents():
    """A new batch brings new document tensors (same shapes): the compiled flex must not
    recompile for them (the mask_mod reads them as tensors, not as guarded constants)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch._dynamo

    from titans_train.models.attention.flex import flex_attend
    from titans_train.models.attention.rules import key_layout

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        rows = [[(0, 0, 3 + i), (1, 0, 13 - i)], [(2, 0, 9 - i), (-1, 0, 1), (3, 0, 6 + i)]]
        doc, pos = layout(rows)
        q, q_nope, k, v = (torch.randn(2, H, 16, D, generator=gen) for _ in range(4))
        pk, pv = (torch.randn(2, H, 2, D, generator=gen) for _ in range(2))
        groups = [KeyGroup(pk, pv, Visible()),
                  KeyGroup(k, v, DocCausal(doc, pos, doc, pos, window=5))]  # fmt: skip
        out = flex_attend(q, groups, q_nope, key_layout(groups), compile_backend=counting_backend)
        close(out, sdpa(q, groups, q_nope), tol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 4 batches of one shape"


# ---- document ids and positions from doc_starts ----


def test_document_positions_from_doc_starts():
    starts = torch.tensor([[0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    doc, pos, (last_doc, next_pos) = document_positions(starts)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2, 2]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert last_doc.tolist() == [2, 2] and next_pos.tolist() == [2, 3]


@pytest.mark.parametrize("seed", range(3))
def test_document_positions_streamed_in_pieces_equal_one_call(seed):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(2, 23, generator=gen) < 0.2
    doc, pos, end = document_positions(starts)
    cuts = sorted(torch.randperm(22, generator=gen)[:3].add(1).tolist())
    carry, docs, poss = None, [], []
    for a, b in zip([0, *cuts], [*cuts, 23]):
        d, p, carry = document_positions(starts[:, a:b], carry)
        docs.append(d)
        poss.append(p)
    assert torch.equal(torch.cat(docs, 1), doc) and torch.equal(torch.cat(poss, 1), pos)
    assert all(torch.equal(x, y) for x, y in zip(carry, end))


def test_document_positions_rejects_bad_input():
    with pytest.raises(ValueError, match="doc_starts must be a bool tensor"):
        document_positions(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="carry must be two int64 tensors"):
        document_positions(torch.zeros(2, 5, dtype=torch.bool), (torch.zeros(3).long(),) * 2)
