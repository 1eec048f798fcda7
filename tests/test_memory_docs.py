"""Packed documents in the neural memory (issue 13): inside a packed row every document reads
exactly what it reads run alone from a fresh state, the state streams across calls, and rows
are independent. fp64 throughout."""

import random

import pytest
import torch
from doc_helpers import documents, marks

from titans_train.models.doc_layout import stream_layout
from titans_train.models.memory import NeuralMemory

D, HEADS, CHUNK, NP = 16, 2, 4, 3


pytestmark = pytest.mark.usefixtures("float64")


def make(depth=2, group=0, seed=0):
    torch.manual_seed(seed)
    return NeuralMemory(D, HEADS, chunk_size=CHUNK, depth=depth, checkpoint_group=group)


def alone(mem, x, prefix):
    """One document from a fresh state, written as the blocks did before documents: P || x."""
    if prefix is None:
        return mem(x)[0]
    return mem(torch.cat([prefix, x], 1))[0][:, prefix.shape[1] :]


# boundaries inside a chunk (7), on a chunk boundary (8 with P = 0; 20), two in one chunk (9, 10)
ROWS = [[7, 8, 20], [9, 10, 23], [], [1, 2, 3, 4]]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("group", [0, 2])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_document_reads_what_it_reads_alone(depth, group, with_prefix):
    mem = make(depth, group)
    T = 29
    x = torch.randn(len(ROWS), T, D)
    prefix = torch.randn(1, NP, D) if with_prefix else None
    starts = marks(T, ROWS)
    out, _ = mem(x, doc_starts=starts, prefix=prefix)
    for b in range(len(ROWS)):
        for a, e in documents(starts, b):
            torch.testing.assert_close(
                out[b : b + 1, a:e], alone(mem, x[b : b + 1, a:e], prefix), rtol=0, atol=1e-10
            )


def test_gradients_equal_the_documents_run_alone():
    """d(sum of every document's loss)/d(parameters) is the same packed and alone."""
    mem = make(2, group=2)
    T = 22
    x = torch.randn(2, T, D, requires_grad=True)
    prefix = torch.randn(1, NP, D, requires_grad=True)
    starts = marks(T, [[5, 6, 13], [8]])
    w = torch.randn(2, T, D)
    params = [*mem.parameters(), x, prefix]

    packed = (mem(x, doc_starts=starts, prefix=prefix)[0] * w).sum()
    g_packed = torch.autograd.grad(packed, params, allow_unused=True)
    ref = sum(
        (alone(mem, x[b : b + 1, a:e], prefix) * w[b : b + 1, a:e]).sum()
        for b in range(2)
        for a, e in documents(starts, b)
    )
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(g_packed, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_streaming_with_documents_equals_one_call(seed):
    """Random split points, the state carried: the same reads as one call, and the same state."""
    mem = make(2)
    rng = random.Random(seed)
    T = 31
    x = torch.randn(3, T, D)
    prefix = torch.randn(1, NP, D)
    starts = torch.rand(3, T, generator=torch.Generator().manual_seed(seed)) < 0.15
    whole, st_whole = mem(x, doc_starts=starts, prefix=prefix)
    cuts = sorted(rng.sample(range(1, T), 3))
    outs, st = [], None
    for a, e in zip([0, *cuts], [*cuts, T]):
        o, st = mem(x[:, a:e], st, doc_starts=starts[:, a:e], prefix=prefix)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(st.doc_pos, st_whole.doc_pos, rtol=0, atol=0)
    for a, b in zip(mem.current_weights(st)[0], mem.current_weights(st_whole)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_state_without_documents_continues_with_them():
    """A sequence begun without doc_starts continues as its first document."""
    mem = make(2)
    x = torch.randn(2, 21, D)
    starts = marks(21, [[15], []])
    whole, _ = mem(x, doc_starts=starts)
    first, st = mem(x[:, :9])
    rest, _ = mem(x[:, 9:], st, doc_starts=starts[:, 9:])
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=1e-12)


def test_rows_are_independent():
    mem = make(2)
    x = torch.randn(3, 18, D)
    starts = marks(18, [[4], [11, 12], []])
    out, _ = mem(x, doc_starts=starts)
    for b in range(3):
        one, _ = mem(x[b : b + 1], doc_starts=starts[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], one, rtol=0, atol=1e-12)


def test_no_marks_equals_the_plain_memory():
    mem = make(2)
    x = torch.randn(2, 13, D)
    plain, st_plain = mem(x)
    docs, st_docs = mem(x, doc_starts=torch.zeros(2, 13, dtype=torch.bool))
    torch.testing.assert_close(docs, plain, rtol=0, atol=1e-12)
    for a, b in zip(mem.current_weights(st_docs)[0], mem.current_weights(st_plain)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_layout_puts_documents_on_chunk_boundaries():
    starts = marks(10, [[3, 4]])
    lay = stream_layout(starts, torch.tensor([6]), prefix=1, chunk=4)
    # continued doc: r = 2 buffered slots, tokens 0-2 at 2-4; doc 1: P at 8, token 3 at 9;
    # doc 2: P at 12, tokens 4-9 at 13-18
    assert lay.slot.tolist() == [[2, 3, 4, 9, 13, 14, 15, 16, 17, 18]]
    assert lay.reset.tolist() == [[False, False, True, True, False]]
    # chunks 1 and 2 end in padding but the next chunk resets, so they commit (no select);
    # chunk 4 holds the unfinished tail
    assert lay.commit.tolist() == [[True, True, True, True, False]]
    assert lay.doc_pos.tolist() == [7] and lay.tail.tolist() == [3]


def test_bad_doc_starts_shape_names_it():
    mem = make(1)
    with pytest.raises(ValueError, match="doc_starts has shape"):
        mem(torch.randn(2, 8, D), doc_starts=torch.zeros(2, 9, dtype=torch.bool))


def test_a_call_of_padding_only_keeps_the_state():
    """A call where no row has a valid token (a MAC grid padded to another rank's length) used to
    fail to reshape an empty stream. Now it reads 0 and leaves M, S, the buffer and the
    positions as they were, with rows on a chunk boundary (no buffer) and inside one."""
    mem = make(2)
    x = torch.randn(2, 11, D)
    _, st = mem(x, doc_starts=marks(11, [[], [3]]))  # row 0: 3 buffered tokens; row 1: none
    assert st.doc_pos.tolist() == [11, 8]
    out, st2 = mem(torch.randn(2, 4, D), st, valid=torch.zeros(2, 4, dtype=torch.bool))
    assert out.abs().max() == 0
    assert st2.doc_pos.tolist() == [11, 8]
    for now, before in zip(mem.current_weights(st2), mem.current_weights(st)):
        for a, b in zip(now, before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, empty = mem(x[:, :8], doc_starts=marks(8, [[], [4]]))  # both rows on a chunk boundary
    out, _ = mem(torch.randn(2, 4, D), empty, valid=torch.zeros(2, 4, dtype=torch.bool))
    assert out.shape == (2, 4, D) and out.abs().max() == 0


def test_tokens_that_are_not_valid_are_left_out():
    """valid=False tokens are neither written nor read (output 0): the others read what the
    row's valid tokens alone read, documents included, and the state carries on."""
    mem = make(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, D)
    valid = torch.rand(2, 24, generator=g) < 0.7
    starts = marks(24, [[10], [5, 17]]) & valid
    out, st = mem(x, doc_starts=starts, valid=valid)
    assert out[~valid].abs().max() == 0
    for b in range(2):
        v = valid[b]
        one, _ = mem(x[b : b + 1, v], doc_starts=starts[b : b + 1, v])
        torch.testing.assert_close(out[b : b + 1, v], one, rtol=0, atol=1e-12)
    # a call where a row has no valid token at all leaves that row's state as it was
    none = torch.zeros(2, 3, dtype=torch.bool)
    none[0] = True
    _, st2 = mem(torch.randn(2, 3, D), st, valid=none)
    torch.testing.assert_close(st2.doc_pos[1], st.doc_pos[1])
    for a, b in zip(mem.current_weights(st2)[0], mem.current_weights(st)[0]):
        torch.testing.assert_close(a[HEADS:], b[HEADS:], rtol=0, atol=0)
