"""Document resets in the chunk scan (memory_math.DocFlags): a reset before chunk c continues
exactly like a fresh scan from M_0, and an uncommitted chunk leaves the state as it was."""

import pytest
import torch
from test_memory_math import make_inputs

from titans_train.models.memory_math import DocFlags
from titans_train.models.memory_scan import memory_scan

pytestmark = pytest.mark.usefixtures("float64")


def scan(W, S, k, v, q, theta, eta, keep, chunk=4, group=0, flags=None):
    gates = (theta, torch.log(eta), torch.log(keep))
    return memory_scan(W, S, k, v, q, *gates, chunk, True, checkpoint_group=group, flags=flags)


def cut(x, a, b):
    return x[:, a:b]


@pytest.mark.parametrize("group", [0, 2])
@pytest.mark.parametrize("N", [24, 26])  # whole chunks only / a trailing partial chunk
def test_reset_equals_a_fresh_scan_from_m0(group, N):
    """Group 1 restarts at chunk 2 (token 8); group 0 never does. Reads and final state of group
    1 equal [scan of tokens 0..7 from its own state] + [scan of tokens 8.. from M_0, S = 0]."""
    W, S, k, v, q, theta, eta, keep = make_inputs(G=2, N=N)
    W0 = [torch.randn_like(w) for w in W]
    chunks = -(-N // 4)
    reset = torch.zeros(2, chunks, dtype=torch.bool)
    reset[1, 2] = True
    commit = torch.ones(2, chunks, dtype=torch.bool)
    y, Wn, Sn = scan(
        W, S, k, v, q, theta, eta, keep, group=group, flags=DocFlags(W0, reset, commit)
    )
    y_plain, W_plain, S_plain = scan(W, S, k, v, q, theta, eta, keep, group=group)
    torch.testing.assert_close(y[0], y_plain[0], rtol=0, atol=1e-12)
    for a, b in zip(Wn + Sn, W_plain + S_plain):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)

    first = scan(*([w[1:] for w in W], [s[1:] for s in S]),
                 *(cut(t[1:], 0, 8) for t in (k, v, q, theta, eta, keep)))  # fmt: skip
    second = scan([w[1:] for w in W0], [torch.zeros_like(s[1:]) for s in S],
                  *(cut(t[1:], 8, N) for t in (k, v, q, theta, eta, keep)))  # fmt: skip
    torch.testing.assert_close(y[1], torch.cat([first[0], second[0]], 1)[0], rtol=0, atol=1e-10)
    for a, b in zip(Wn + Sn, second[1] + second[2]):
        torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-10)


def test_reset_in_the_trailing_partial_chunk_returns_m0():
    W, S, k, v, q, theta, eta, keep = make_inputs(G=1, N=10)
    W0 = [torch.randn_like(w) for w in W]
    reset = torch.tensor([[False, False, True]])
    flags = DocFlags(W0, reset, torch.ones(1, 3, dtype=torch.bool))
    y, Wn, Sn = scan(W, S, k, v, q, theta, eta, keep, flags=flags)
    fresh = scan(
        W0, [torch.zeros_like(s) for s in S], *(cut(t, 8, 10) for t in (k, v, q, theta, eta, keep))
    )
    torch.testing.assert_close(y[:, 8:], fresh[0], rtol=0, atol=1e-12)
    for a, b in zip(Wn + Sn, W0 + [torch.zeros_like(s) for s in S]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("group", [0, 2])
def test_uncommitted_chunks_keep_the_state(group):
    """Chunks 3 and 4 of group 0 are not committed: its final state is the one after chunk 2,
    and its reads (which precede any commit) are unchanged."""
    W, S, k, v, q, theta, eta, keep = make_inputs(G=2, N=20)
    commit = torch.ones(2, 5, dtype=torch.bool)
    commit[0, 3:] = False
    flags = DocFlags(W, torch.zeros(2, 5, dtype=torch.bool), commit)
    y, Wn, Sn = scan(W, S, k, v, q, theta, eta, keep, group=group, flags=flags)
    y_all, _, _ = scan(W, S, k, v, q, theta, eta, keep, group=group)
    _, W12, S12 = scan(W, S, *(cut(t, 0, 12) for t in (k, v, q, theta, eta, keep)))
    torch.testing.assert_close(y[0, :16], y_all[0, :16], rtol=0, atol=1e-12)
    for a, b in zip(Wn + Sn, W12 + S12):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)


def test_gradients_with_flags_match_across_checkpoint_groups():
    """The checkpointed groups recompute with the same flags: gradients to every input, M_0
    included, equal the plain scan's."""
    W, S, k, v, q, theta, eta, keep = make_inputs(G=2, N=22)
    W0 = [torch.randn_like(w) for w in W]
    reset = torch.tensor([[False, True, False, False, True, False], [False] * 6])
    commit = torch.tensor([[True, True, True, False, True, False], [True] * 6])

    def grads(group):
        leaves = [t.clone().requires_grad_() for t in (*W, *S, *W0, k, v, q, theta)]
        Wl, Sl, W0l = leaves[:2], leaves[2:4], leaves[4:6]
        kk, vv, qq, th = leaves[6:]
        y, Wn, Sn = scan(Wl, Sl, kk, vv, qq, th, eta, keep, group=group,
                         flags=DocFlags(W0l, reset, commit))  # fmt: skip
        (y.square().sum() + sum(w.square().sum() for w in Wn + Sn)).backward()
        return [t.grad for t in leaves]

    for a, b in zip(grads(0), grads(2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    g = grads(0)
    assert all(gw0[0].abs().sum() > 0 for gw0 in g[4:6])  # M_0 gets a gradient where used
    assert all(gw0[1].abs().sum() == 0 for gw0 in g[4:6])  # and none where never reset
