"""Packed-document fixtures. For the attention (test_attention_docs, test_flash_contract): two
rows with different document boundaries, a cache from an earlier call, a persistent prefix,
padding, and an explicit per-row reference (mask written out, softmax, average). For the memory
and the model (test_memory_docs, test_documents_model): ``marks`` and ``documents``."""

import math

import torch

from titans_train.models.attention import DocCausal, KeyGroup, Visible

F64 = torch.float64
H, D = 2, 8

# Two rows of 16 new tokens each, documents as (doc id, first position, length); -1 = padding.
# Row 0 continues document 0 from an earlier call (its cache holds positions 5..9).
ROWS = [
    [(0, 10, 4), (1, 0, 7), (2, 0, 5)],
    [(3, 0, 3), (-1, 0, 2), (4, 0, 11)],
]
CACHE = [[(0, 5, 5)], [(7, 0, 5)]]  # row 1's cached document 7 does not continue


def layout(rows):
    doc = [[d for d, _, n in row for _ in range(n)] for row in rows]
    pos = [[p + i for _, p, n in row for i in range(n)] for row in rows]
    return torch.tensor(doc), torch.tensor(pos)


def visible(rule, b, t, s):
    """The DocCausal definition, written out for one (row, query, key)."""
    if isinstance(rule, Visible):
        return True
    qd, qp = int(rule.q_doc[b, t]), int(rule.q_pos[b, t])
    kd, kp = int(rule.k_doc[b, s]), int(rule.k_pos[b, s])
    return (
        qd == kd != -1
        and kp <= qp
        and (rule.window is None or qp - kp < rule.window)
        and (rule.segment is None or kp // rule.segment == qp // rule.segment)
    )


def naive_attend(q, groups, q_nope=None):
    """Per (row, query): gather the visible keys, softmax, average values; no key -> 0."""
    out = q.new_zeros(*q.shape[:-1], groups[0].v.shape[-1])
    rows = []
    for b in range(q.shape[0]):
        cols = []
        for t in range(q.shape[2]):
            logits, values = [], []
            for g in groups:
                idx = [s for s in range(g.k.shape[2]) if visible(g.rule, b, t, s)]
                if idx:
                    qt = (q_nope if isinstance(g.rule, Visible) else q)[b, :, t]
                    logits.append((g.k[b][:, idx] * qt[:, None]).sum(-1) / math.sqrt(D))
                    values.append(g.v[b][:, idx])
            if not logits:
                cols.append(out[b, :, t])
                continue
            p = torch.softmax(torch.cat(logits, -1), -1)
            cols.append((p[..., None] * torch.cat(values, 1)).sum(1))
        rows.append(torch.stack(cols, 1))
    return torch.stack(rows)


def make(window=None, segment=None, prefix=True, cache=True, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_doc, q_pos = layout(ROWS)
    n = q_doc.shape[1]

    def rnd(s):
        return torch.randn(2, H, s, D, generator=gen, dtype=F64).to(dtype).requires_grad_()

    q, q_nope = rnd(n), rnd(n)
    groups = [KeyGroup(rnd(3), rnd(3), Visible())] if prefix else []
    if cache:
        c_doc, c_pos = layout(CACHE)
        rule = DocCausal(q_doc, q_pos, c_doc, c_pos, window, segment)
        groups.append(KeyGroup(rnd(5), rnd(5), rule))
    groups.append(KeyGroup(rnd(n), rnd(n), DocCausal(q_doc, q_pos, q_doc, q_pos, window, segment)))
    return q, q_nope, groups


CASES = [
    dict(),
    dict(window=3),
    dict(segment=4),
    dict(window=3, segment=4),
    dict(window=6, prefix=False),  # cache band of 4 queries x 5 keys: alignment matters
    dict(prefix=False, cache=False),
]


def irregular(seed, dtype=F64):
    """Random layouts: document ids out of order, one document in several runs, gaps in
    positions, padding, more keys than queries (seed 0: window 4 + segment 3; 1: window 4;
    2: neither)."""
    gen = torch.Generator().manual_seed(seed)
    n_q, n_k = 11, 14
    q_doc = torch.randint(-1, 3, (2, n_q), generator=gen)
    k_doc = torch.randint(-1, 3, (2, n_k), generator=gen)
    q_pos = torch.randint(0, 9, (2, n_q), generator=gen)
    k_pos = torch.randint(0, 9, (2, n_k), generator=gen)
    window, segment = [(4, 3), (4, None), (None, None)][seed]
    rule = DocCausal(q_doc, q_pos, k_doc, k_pos, window=window, segment=segment)

    def rnd(s):
        return torch.randn(2, H, s, D, generator=gen, dtype=F64).to(dtype).requires_grad_()

    q, q_nope = rnd(n_q), rnd(n_q)
    return q, q_nope, [KeyGroup(rnd(2), rnd(2), Visible()), KeyGroup(rnd(n_k), rnd(n_k), rule)]


def leaves(q, q_nope, groups):
    return [q, q_nope, *(t for g in groups for t in (g.k, g.v))]


def forward_and_grads(fn, q, q_nope, groups):
    out = fn(q, groups, q_nope)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    xs = leaves(q, q_nope, groups)
    grads = torch.autograd.grad((out * w).sum(), xs, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]


def marks(T: int, rows: list[list[int]]) -> torch.Tensor:
    """doc_starts [len(rows), T]: True at the listed positions of each row."""
    starts = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, where in enumerate(rows):
        starts[b, where] = True
    return starts


def documents(starts: torch.Tensor, b: int) -> list[tuple[int, int]]:
    """(start, end) of every document of row b (the first from 0, whether marked or not)."""
    cuts = [0] + [int(i) for i in starts[b].nonzero()[:, 0] if i > 0] + [starts.shape[1]]
    return list(zip(cuts[:-1], cuts[1:]))


@torch.no_grad()
def assert_documents_alone(model, tokens: torch.Tensor, starts: torch.Tensor, atol=1e-10):
    """Each document of the packed rows ``tokens`` (doc_starts ``starts``) gets the logits it
    gets alone, from a fresh state."""
    packed = model(tokens, doc_starts=starts).logits
    for b in range(tokens.shape[0]):
        for a, e in documents(starts, b):
            alone = model(tokens[b : b + 1, a:e]).logits
            torch.testing.assert_close(packed[b : b + 1, a:e], alone, rtol=0, atol=atol)


@torch.no_grad()
def assert_streaming_equals_one_call(model, tokens, starts, cuts: list[int], atol=1e-10):
    """The packed rows fed in pieces cut at ``cuts`` with the state carried equal one call."""
    whole = model(tokens, doc_starts=starts).logits
    outs, state = [], None
    T = tokens.shape[1]
    for a, e in zip([0, *cuts], [*cuts, T]):
        out = model(tokens[:, a:e], state=state, doc_starts=starts[:, a:e])
        outs.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=atol)
