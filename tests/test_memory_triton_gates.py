"""The forward kernels compute each chunk's decay coefficients from its gates (issue 14): a span
is one launch, coefficients included (``kernels.span_gates`` in place of ``span_coeffs``' five
tensors, ``memory_triton_ops._gate_coeffs``), in Triton's interpreter against the eager scan."""

import pytest
import torch
from test_memory_triton import (  # noqa: F401 (interpreter: the autouse fixture)
    CountedLaunch,
    assert_all_close,
    interpreter,
    kernel,
    make_flags,
    make_inputs,
)

from titans_train.models import memory_scan as memory_scan_mod
from titans_train.models.kernels import span_gates
from titans_train.models.memory_math import scan_chunks, span_coeffs


@pytest.mark.parametrize(
    "depth,P,rn,tile,N",
    # linear memory; shared gates on the register kernel; per-layer gates streamed in 4 tiles;
    # chunk 16 (coefficients over 16 tokens)
    [(1, 1, True, 0, 8), (2, 1, False, 0, 8), (2, 2, True, 16, 8), (2, 2, True, 0, 16)],
)
def test_gate_coefficients_equal_scan_chunks(depth, P, rn, tile, N):
    """Reads and final M, S from the gates equal scan_chunks on span_coeffs' coefficients, fp64,
    3 chunks with exact eta = 0 and alpha = 1 (-inf logs) and document flags."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(
        depth=depth, P=P, N=3 * N, exact_gates=True, lr=2.4 / N
    )
    assert torch.isinf(log_eta).any() and torch.isinf(log_keep).any()
    fl = make_flags(W, 3)
    gates = span_gates(theta, log_eta, log_keep, N)
    assert [tuple(g.shape) for g in gates] == [(P, 2, 3, N)] * 3
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, gates, N, rn, flags=fl, tile=tile)
    co = span_coeffs(theta, log_eta, log_keep, N)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, N, rn, flags=fl)
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)


def test_gate_coefficients_fp32():
    """fp32 to 1e-5, as the loaded coefficients."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(P=2, N=32, dt=torch.float32)
    gates = span_gates(theta, log_eta, log_keep, 16)
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, gates, 16, True)
    co = span_coeffs(theta, log_eta, log_keep, 16)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, 16, True)
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-5)


@pytest.mark.parametrize(
    "depth,P,rn,flags,tile",
    # linear; shared gates summed over two layers (register backward); per-layer gates on the
    # streamed backward in 4 tiles, with documents
    [(1, 1, True, True, None), (2, 1, False, False, 0), (2, 2, True, True, 16)],
)
def test_gate_gradients_equal_autograd(depth, P, rn, flags, tile):
    """The fused backward on the gates returns the gates' gradients (theta, log eta,
    log(1 - alpha)) and those of M, S, k, v, q, M_0, equal to autograd through span_coeffs and
    the eager scan, fp64, exact eta = 0 / alpha = 1 (-inf logs), 3 chunks."""
    from titans_train.models.kernels.memory_triton_bwd import scan_chunks_triton_backward
    from titans_train.models.memory_scan import _scan_flat, flatten_flags

    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(depth=depth, P=P, exact_gates=True)
    fl = flatten_flags(make_flags(W, 3) if flags else None)
    state = [t.requires_grad_() for t in (*W, *S, k, v, q)]
    gates = [t.requires_grad_() for t in (theta, log_eta, log_keep)]
    flag_leaves = [t.requires_grad_(t.dtype.is_floating_point) for t in fl]
    outs = _scan_flat([*state, *span_coeffs(*gates, 8), *flag_leaves], depth, 8, rn, False)
    outs = [outs[0], *outs[1], *outs[2]]
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    leaves = state + gates + [t for t in flag_leaves if t.requires_grad]
    want = torch.autograd.grad(outs, leaves, grads)
    inputs = [t.detach() for t in (*state, *span_gates(*gates, 8), *fl)]
    got = scan_chunks_triton_backward(inputs, depth, 8, rn, grads, tile)
    got = [a for a, t in zip(got, inputs) if t.dtype.is_floating_point]
    n = len(state)
    want = [*want[:n], *span_gates(*want[n : n + 3], 8), *want[n + 3 :]]  # gates folded
    assert len(got) == len(want)
    assert_all_close(got, want, 1e-10)


def test_memory_scan_on_the_kernel_is_one_launch_without_coefficient_tensors(monkeypatch):
    """Without grad, memory_scan(triton=True) over 4 chunks is one kernel launch and builds no
    coefficient tensors (span_coeffs is not called); with grad it is not called either: the
    forward and the backward's two launches compute the coefficients from the gates and the
    backward returns the gates' gradients; outputs and gradients equal eager (fp64)."""
    mod = kernel()
    launches, coeff_calls = [], []
    real = memory_scan_mod.span_coeffs
    counted = CountedLaunch(mod._memory_scan_kernel, launches)
    monkeypatch.setattr(mod, "_memory_scan_kernel", counted)
    monkeypatch.setattr(
        memory_scan_mod, "span_coeffs", lambda *a: coeff_calls.append(1) or real(*a)
    )
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(depth=1, N=32, exact_gates=True)
    args = (k, v, q, theta, log_eta, log_keep, 8, True)
    with torch.no_grad():
        y, w, s = memory_scan_mod.memory_scan(W, S, *args, triton=True)
    assert (len(launches), coeff_calls) == (1, [])
    y0, w0, s0 = memory_scan_mod.memory_scan(W, S, *args)
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)

    leaves = [t.detach().requires_grad_() for t in (*W, *S, k, v, q, theta, log_eta, log_keep)]

    def grads(triton: bool):
        y, w, s = memory_scan_mod.memory_scan(
            leaves[:1], leaves[1:2], *leaves[2:], 8, True, 2, triton=triton
        )
        return torch.autograd.grad(y.square().sum() + w[0].sum() + s[0].sum(), leaves)

    launches.clear(), coeff_calls.clear()
    got = grads(True)
    assert coeff_calls == [] and len(launches) == 2 * 2  # 2 groups: forward + rebuild each
    assert_all_close(got, grads(False), 1e-10)
