"""The Triton memory kernels (issue 14) at widths that are not powers of two (padded inside the
kernels) and for states over the register budget (the streamed kernels), against the eager scan
in Triton's interpreter. Helpers and the interpreter fixture come from test_memory_triton."""

import importlib

import pytest
import torch
from test_memory_triton import (  # noqa: F401 (interpreter: the autouse fixture)
    KERNEL_MODULE,
    CountedLaunch,
    assert_all_close,
    check_backward,
    compile_for_cuda,
    grads_of,
    interpreter,
    kernel,
    make_flags,
    make_inputs,
)

from titans_train.models import kernels as kernels_mod
from titans_train.models.memory_math import scan_chunks, span_coeffs

# Widths that are not powers of two: head dim 24 / hidden 48 (blocks 32 / 64), a depth-1 odd
# width 13 (block 16), head dim 16 with hidden 40 (only the hidden padded).
PADDED = [(24, 48, 2, 2, True), (13, 0, 1, 1, True), (16, 40, 2, 1, False)]


@pytest.mark.parametrize("D,hidden,depth,P,rn", PADDED)
def test_padded_widths_forward_equals_scan_chunks(D, hidden, depth, P, rn):
    """Widths padded to powers of two inside the kernel: reads and final M, S equal
    scan_chunks in fp64, with document flags; LayerNorm statistics use the true width."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(
        D=D, depth=depth, P=P, exact_gates=True, hidden=hidden
    )
    co = span_coeffs(theta, log_eta, log_keep, 8)
    fl = make_flags(W, 3)
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, co, 8, rn, flags=fl)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, 8, rn, flags=fl)
    assert [t.shape for t in [y, *w, *s]] == [t.shape for t in [y0, *w0, *s0]]
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)


def test_register_backward_at_depth_2_equals_autograd():
    """The register backward kernel at depth 2 (depth 2 runs the streamed backward by default,
    ``kernels.backward_tile``; the register one is kept for comparison on a GPU)."""
    check_backward(2, 2, True, True, tile=0)


@pytest.mark.parametrize("D,hidden,depth,P,rn", PADDED)
def test_padded_widths_backward_equals_autograd(D, hidden, depth, P, rn):
    """The fused backward at padded widths: gradients of every input equal autograd (fp64).
    Depth 2 on the streamed kernels with hidden tiles of 16 (3 tiles; over hidden 40 the last
    one masked), as on a GPU (the interpreter's default is one tile, ``backward_tile``)."""
    check_backward(depth, P, rn, True, D=D, hidden=hidden, tile=16 if depth == 2 else None)


def nan_tailed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous view at the start of a larger NaN-filled buffer: a read past the
    end of a row block (an unmasked padded column) would bring NaN in."""
    buf = torch.full((t.numel() + 4096,), float("nan"), dtype=t.dtype)
    view = buf[: t.numel()].view(t.shape)
    view.copy_(t)
    return view


def test_padded_state_never_leaks():
    """Head dim 24 / hidden 48 (padded to 32 / 64), every input ending where a NaN buffer
    begins: the chunk-start states the kernel saves for the backward (true shapes, pre-filled
    with NaN) equal eager's state after each prefix of chunks, and the returned M, S have the
    true shapes and equal eager. Nothing outside the true widths is read or written."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(D=24, hidden=48, N=24)
    co = span_coeffs(theta, log_eta, log_keep, 8)
    W, S, co = [nan_tailed(t) for t in W], [nan_tailed(t) for t in S], [nan_tailed(t) for t in co]
    k, v, q = nan_tailed(k), nan_tailed(v), nan_tailed(q)
    states = [torch.full((2, 3, *w.shape[1:]), float("nan"), dtype=w.dtype) for w in W + S]
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, co, 8, True, states=states)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, 8, True)
    assert [t.shape for t in w + s] == [t.shape for t in W + S]
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)
    assert_all_close([x[:, 0] for x in states], W + S, 0)
    for c in (1, 2):  # the state at the start of chunk c: eager over the first c chunks
        _, wc, sc = scan_chunks(W, S, k[:, : 8 * c], v[:, : 8 * c], None,
                                [x[:, :, :c] for x in co], 8, True)  # fmt: skip
        assert_all_close([x[:, c] for x in states], wc + sc, 1e-12)


@pytest.mark.parametrize(
    "D,hidden,P,rn,flags",
    # 4 tiles of 16 with documents; 3 tiles of 16 over hidden 40 (a masked tail), no flags
    [(16, 64, 1, True, True), (24, 40, 2, False, False)],
)
def test_streamed_kernel_equals_scan_chunks(D, hidden, P, rn, flags):
    """The streamed kernel (state in global memory, hidden in tiles of 16) gives scan_chunks'
    reads and final M, S (fp64), and the same chunk-start states as the register kernel."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(D=D, P=P, exact_gates=True, hidden=hidden)
    co = span_coeffs(theta, log_eta, log_keep, 8)
    fl = make_flags(W, 3) if flags else None
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, co, 8, rn, flags=fl, tile=16)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, 8, rn, flags=fl)
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)
    got, want = ([torch.full((2, 3, *x.shape[1:]), float("nan"), dtype=x.dtype) for x in W + S]
                 for _ in range(2))  # fmt: skip
    kernel().scan_chunks_triton(W, S, k, v, None, co, 8, rn, flags=fl, states=got, tile=16)
    kernel().scan_chunks_triton(W, S, k, v, None, co, 8, rn, flags=fl, states=want, tile=0)
    assert_all_close(got, want, 1e-12)


def test_large_state_trains_on_the_streamed_kernel(monkeypatch):
    """A state over the register budget runs the streamed kernel (the budget shrunk so that head
    dim 16 / hidden 64 counts as large): memory_scan's outputs and gradients equal eager, with
    checkpoint groups, documents and a partial chunk (the backward rebuilds its chunk-start
    states with the streamed kernel, then runs the fused backward)."""
    from titans_train.models import kernels

    monkeypatch.setattr(kernels, "AUTO_STATE_ELEMENTS", 2048)
    monkeypatch.setattr(kernels, "STREAM_TILE_ELEMENTS", 1024)  # 4 tiles of 16
    assert kernels.stream_tile([16, 64, 16]) == 16 and kernels.stream_tile([16, 16]) == 0
    launches = {}
    for suffix, name in (("_streamed", "_memory_scan_streamed_kernel"),
                         ("_streamed_bwd", "_memory_scan_streamed_bwd_kernel")):  # fmt: skip
        mod, launches[name] = importlib.import_module(KERNEL_MODULE + suffix), []
        monkeypatch.setattr(mod, name, CountedLaunch(getattr(mod, name), launches[name]))
    outs, grads = grads_of(True, 2, True, 29)
    # forward and the rebuild in backward, then the backward, for each of 2 groups
    assert [len(n) for n in launches.values()] == [4, 2]
    outs0, grads0 = grads_of(False, 2, True, 29)
    assert_all_close(outs, outs0, 1e-12)
    assert_all_close(grads, grads0, 1e-10)


@pytest.mark.slow
def test_streamed_kernels_compile_for_the_paper_head_with_little_stack():
    """Head dim 64 / hidden 256 (256 KB of state per group), streamed in tiles of 16, the
    coefficients computed from the gates: 56 bytes of stack a thread on sm90 in the forward (16
    with loaded coefficients; the register kernel at the 170M preset's 48 / 192, padded to the
    same blocks, spills 20,512), 504 in the backward (512 loaded). Checked: at most 64 and
    1,024 bytes."""
    assert kernels_mod.stream_tile([64, 256, 64]) == 16
    lines = compile_for_cuda([([64, 256, 64], 90, False, 16), ([64, 256, 64], 90, True, 16)])
    stacks = [int(line.split("STACK:")[1].split()[0]) for line in lines]
    assert stacks[0] <= 64 and stacks[1] <= 1024, lines


def test_backward_tile_choice(monkeypatch):
    """Depth 2 takes the streamed backward at tiles of 16 on a GPU, at every width; depth 1 the
    register one; the interpreter runs a state within the register budget as one tile."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiles = [kernels_mod.backward_tile(d) for d in ([16, 64, 16], [64, 256, 64], [16, 16])]
    assert tiles == [16, 16, 0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels_mod.backward_tile([16, 64, 16]) == 64
    assert kernels_mod.backward_tile([24, 48, 24]) == 64
    assert kernels_mod.backward_tile([64, 256, 64]) == 16
