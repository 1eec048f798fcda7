"""NeuralMemory module: streaming state, causality, batch independence, gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import naive_memory, ref_mlp
from torch._dynamo.utils import counters
from torch.func import functional_call

from titans_train.models.memory import NeuralMemory, causal_conv

DT = torch.float64


def make(dim=16, heads=2, chunk=4, depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    return NeuralMemory(dim, heads, chunk_size=chunk, depth=depth, **kw).to(DT)


def random_splits(T, gen):
    cuts = sorted(set(torch.randint(1, T, (5,), generator=gen).tolist()))
    bounds = [0, *cuts, T]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def stream(mem, x, splits):
    outs, state = [], None
    for sl in splits:
        o, state = mem(x[:, sl], state)
        outs.append(o)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_any_split_equals_one_call(depth):
    mem = make(depth=depth)
    x = torch.randn(2, 29, 16, dtype=DT)
    full, state_full = mem(x)
    gen = torch.Generator().manual_seed(1)
    for splits in (
        [slice(t, t + 1) for t in range(29)],  # token by token
        random_splits(29, gen),
        random_splits(29, gen),
    ):
        out, state = stream(mem, x, splits)
        torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)
        for a, b in zip(mem.current_weights(state)[0], mem.current_weights(state_full)[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_current_weights_match_naive_recurrence():
    """M_t after every prefix length, against the per-token autograd loop on the same inputs."""
    mem = make(chunk=4)
    x = torch.randn(1, 11, 16, dtype=DT)
    # Recompute the module's inner inputs the same way it does.
    qkv, _ = causal_conv(F.linear(x, mem.w_qkv), mem.conv, None)
    q, k, v = (mem._heads(t) for t in F.silu(qkv).split(16, dim=-1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    theta, log_eta, log_keep = mem._gates(x)
    W0, S0 = mem._initial(1)
    _, _, per_token = naive_memory(W0, S0, k, v, q, theta, log_eta.exp(), log_keep.exp(), 4, True)
    state = None
    for t in range(11):  # every prefix length, inside chunks and on boundaries
        _, state = mem(x[:, t : t + 1], state)
        W_t, S_t = mem.current_weights(state)
        for a, b in zip(W_t + S_t, per_token[t][0] + per_token[t][1]):
            torch.testing.assert_close(a, b)


def test_causal():
    mem = make()
    x = torch.randn(2, 24, 16, dtype=DT)
    base, _ = mem(x)
    for j in (0, 5, 8, 13, 23):  # inside a chunk, on a boundary, ...
        x2 = x.clone()
        x2[:, j] += torch.randn(16, dtype=DT)
        out, _ = mem(x2)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-6


def test_batch_independence():
    mem = make()
    x = torch.randn(4, 13, 16, dtype=DT)
    perm = torch.tensor([2, 0, 3, 1])
    out, _ = mem(x)
    out_p, _ = mem(x[perm])
    torch.testing.assert_close(out_p, out[perm], rtol=1e-12, atol=1e-12)
    x2 = x.clone()
    x2[1] = torch.randn(13, 16, dtype=DT)  # changing one sample leaves the others untouched
    out2, _ = mem(x2)
    torch.testing.assert_close(out2[[0, 2, 3]], out[[0, 2, 3]], rtol=0, atol=0)


def test_read_only_reads_chunk_start_weights():
    mem = make(chunk=4)
    x = torch.randn(2, 8, 16, dtype=DT)
    _, state = mem(x)  # two full chunks
    # A retrieval state shares the weights but has its own conv tail over its own input stream.
    retr = dataclasses.replace(state, conv_tail=None, buffer=None)
    xr = torch.randn(2, 5, 16, dtype=DT)
    r, rstate = mem(xr, retr, read_only=True)
    assert r.shape == (2, 5, 16)
    assert rstate.weights is state.weights  # reading never writes
    qc, _ = causal_conv(F.linear(xr, mem.w_qkv[:16]), mem.conv[:16], None)
    q = F.normalize(F.silu(mem._heads(qc)), dim=-1)
    want = ref_mlp(state.weights, q, True)
    torch.testing.assert_close(r, mem._merge(want, 2))
    with pytest.raises(RuntimeError, match="chunk boundary"):
        _, mid = mem(x[:, :3])
        mem(xr, mid, read_only=True)
    r2, _ = mem(torch.randn(2, 5, 16, dtype=DT), None, read_only=True)  # fresh: reads M_0
    assert torch.isfinite(r2).all()


def test_gradcheck_into_every_parameter():
    mem = make(dim=4, heads=2, chunk=4, depth=2, expansion=2)
    x = torch.randn(1, 6, 4, dtype=DT)
    names = [n for n, _ in mem.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mem.parameters()]

    def f(x, *ps):
        return functional_call(mem, dict(zip(names, ps)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params), eps=1e-6, atol=1e-5)


def test_every_parameter_gets_gradient():
    mem = make(per_layer_gates=True)
    x = torch.randn(2, 21, 16, dtype=DT)
    out, _ = mem(x)
    out.square().mean().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_bad_state_is_rejected():
    mem = make(chunk=4)
    _, state = mem(torch.randn(1, 6, 16, dtype=DT))
    state.pos = 8  # claims a boundary, but two tokens are buffered
    with pytest.raises(RuntimeError, match="buffered"):
        mem(torch.randn(1, 2, 16, dtype=DT), state)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_checkpointed_chunks_give_identical_outputs_and_grads(group):
    x = torch.randn(2, 23, 16, dtype=DT)
    results = []
    for g in (0, group):
        mem = make(chunk=4, checkpoint_group=g)
        out, state = mem(x)
        (out.square().sum() + sum(w.sum() for w in state.weights)).backward()
        results.append((out, [p.grad for p in mem.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_chunk_step_matches_eager():
    """torch.compile of the per-chunk step (memory_backend=compile) computes the same function: in
    fp32, compiled and eager are equally close to an fp64 ground truth (relative to each tensor's
    scale).
    """
    x = torch.randn(2, 21, 16, generator=torch.Generator().manual_seed(3))

    def run(backend, dtype):
        torch.manual_seed(0)
        mem = NeuralMemory(16, 2, chunk_size=4, backend=backend).to(dtype)
        out, _ = mem(x.to(dtype))
        out.square().sum().backward()
        return [out.double()] + [p.grad.double() for p in mem.parameters()]

    truth = run("eager", torch.float64)
    graphs = counters["stats"]["unique_graphs"]
    for backend in ("eager", "compile"):
        for got, want in zip(run(backend, torch.float32), truth):
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # One graph for every chunk of a training pass, the first (zero momentum) included.
    assert counters["stats"]["unique_graphs"] - graphs <= 1
