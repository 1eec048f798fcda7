"""The fused Triton kernel of the memory's chunk loop (issue 14) against the eager scan, run on CPU
by Triton's interpreter (TRITON_INTERPRET=1, set before the kernel module is first imported).

Triton is in the dev extra, so these tests run in CI; nothing here is skipped."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from test_memory_ops import OpCounter

from titans_train.models import ModelConfig, NeuralMemory, RuntimeConfig, TitansLM
from titans_train.models import runtime as runtime_mod
from titans_train.models.memory_math import DocFlags, scan_chunks, span_coeffs
from titans_train.models.memory_scan import memory_scan

KERNEL_MODULE = "titans_train.models.kernels.memory_triton"
SLOW = pytest.mark.slow


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The interpreter for this test; the kernel module is (re)loaded under it if an earlier
    import in this process decorated it for the GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = sys.modules.get(KERNEL_MODULE)
    if mod is not None and type(mod._memory_scan_kernel).__name__ != "InterpretedFunction":
        importlib.reload(mod)
    yield


def kernel():
    return importlib.import_module(KERNEL_MODULE)


def make_inputs(
    G=2, D=16, depth=2, P=1, N=24, dt=torch.float64, seed=0, exact_gates=False, lr=0.3, hidden=0
):
    """Memory inputs; ``hidden`` defaults to 4 D (depth 2)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dt)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    dims = [D] + [hidden or 4 * D] * (depth - 1) + [D]
    W = [randn(G, a, b) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    S = [0.1 * randn(*w.shape) for w in W]
    k, v, q = (torch.nn.functional.normalize(randn(G, N, D), dim=-1) for _ in range(3))
    theta = lr * rand(G, N, P)
    log_eta, log_keep = torch.log(rand(G, N, P)), torch.log(1 - 0.1 * rand(G, N, P))
    if exact_gates:  # eta = 0 and alpha = 1 exactly: -inf logs
        log_eta[:, 3], log_keep[:, 10] = float("-inf"), float("-inf")
    return W, S, k, v, q, theta, log_eta, log_keep


def make_flags(W, chunks, seed=1):
    g = torch.Generator().manual_seed(seed)
    G = W[0].shape[0]
    reset = torch.rand(G, chunks, generator=g) < 0.4
    commit = torch.rand(G, chunks, generator=g) < 0.7
    reset[0, 1], commit[1, 1] = True, False  # at least one reset and one discarded chunk
    init = [torch.randn(w.shape, generator=g, dtype=w.dtype) for w in W]
    return DocFlags(init, reset, commit)


def assert_all_close(got, want, tol):
    for a, b in zip(got, want):
        scale = b.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() <= tol * scale, (a - b).abs().max()


CASES = [(depth, P, rn) for depth in (1, 2) for P in sorted({1, depth}) for rn in (False, True)]


@pytest.mark.parametrize("depth,P,rn", CASES)
@pytest.mark.parametrize("flags", [False, True])
def test_kernel_equals_scan_chunks(depth, P, rn, flags):
    """Reads and final M, S of the kernel equal scan_chunks (fp64: to rounding), 3 chunks."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(depth=depth, P=P, exact_gates=True)
    chunk = 8
    co = span_coeffs(theta, log_eta, log_keep, chunk)
    fl = make_flags(W, 3) if flags else None
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, co, chunk, rn, flags=fl)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, chunk, rn, flags=fl)
    assert max(t.abs().max() for t in [y0, *w0, *s0]) < 1e3
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)
    assert all(t.shape == t0.shape for t, t0 in zip(w + s, w0 + s0))


def test_kernel_fp32_and_write_only():
    """fp32 to 1e-5 (per-layer gates, residual norm, flags); without queries it writes only."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(P=2, N=32, dt=torch.float32)
    co = span_coeffs(theta, log_eta, log_keep, 16)
    fl = make_flags(W, 2)
    got = kernel().scan_chunks_triton(W, S, k, v, q, co, 16, True, flags=fl)
    want = scan_chunks(W, S, k, v, q, co, 16, True, flags=fl)
    assert_all_close([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], 1e-5)
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, None, co, 16, True, flags=fl)
    assert y is None
    assert_all_close(w + s, want[1] + want[2], 1e-5)


@pytest.mark.parametrize("depth,P,rn", CASES)
@pytest.mark.parametrize("flags", [False, True])
def test_backward_kernel_equals_autograd(depth, P, rn, flags):
    """The fused backward's gradients of every input of a group (M, S, k, v, q, the five
    coefficient tensors, M_0) equal autograd through the eager scan, fp64; 3 chunks, exact
    eta = 0 / alpha = 1 and a reset and a discarded chunk when flags are on."""
    check_backward(depth, P, rn, flags)


def check_backward(depth, P, rn, flags, D=16, hidden=0, tile=None):
    from titans_train.models.kernels.memory_triton_bwd import scan_chunks_triton_backward
    from titans_train.models.memory_scan import _scan_flat, flatten_flags

    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(
        D=D, depth=depth, P=P, exact_gates=True, hidden=hidden
    )
    co = span_coeffs(theta, log_eta, log_keep, 8)
    inputs = [*W, *S, k, v, q, *co, *flatten_flags(make_flags(W, 3) if flags else None)]
    inputs = [t.detach().requires_grad_(t.dtype.is_floating_point) for t in inputs]
    outs = _scan_flat(inputs, depth, 8, rn, False)
    outs = [outs[0], *outs[1], *outs[2]]
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    used = [t for t in inputs if t.requires_grad]
    want = torch.autograd.grad(outs, used, grads, allow_unused=True)
    got = scan_chunks_triton_backward([t.detach() for t in inputs], depth, 8, rn, grads, tile)
    got = [a for a, t in zip(got, inputs) if t.requires_grad]
    assert len(got) == len(want) == len(used)
    for a, b in zip(got, want):
        b = torch.zeros_like(a) if b is None else b
        if a.dim() == 5:  # C theta, E theta: entries above the diagonal are constant zeros
            a, b = a.tril(), b.tril()
        assert_all_close([a], [b], 1e-10)


def grads_of(triton, group, flags, N, P=1, depth=2, D=16, hidden=0):
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(D=D, depth=depth, P=P, N=N, hidden=hidden)
    leaves = [*W, *S, k, v, q, theta, log_eta, log_keep]
    fl = make_flags(W, -(-N // 8)) if flags else None
    if fl is not None:
        leaves += fl.init
    for t in leaves:
        t.requires_grad_(True)
    y, w, s = memory_scan(W, S, k, v, q, theta, log_eta, log_keep, 8, True,
                          checkpoint_group=group, flags=fl, triton=triton)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    outs = [y, *w, *s]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach() for t in outs], list(grads)


@pytest.mark.parametrize(
    "group,flags,N,D,hidden",
    # one span / checkpoint groups, documents, a partial chunk / head dim 12, hidden 40 (padded)
    [(0, False, 24, 16, 0), (2, True, 29, 16, 0), (2, True, 29, 12, 40)],
)
def test_training_path_gradients_equal_eager(group, flags, N, D, hidden):
    """memory_scan(triton=True): outputs and gradients wrt M, S, k, v, q, the gates and M_0 equal
    the eager path's (the backward recomputes eagerly)."""
    outs, grads = grads_of(True, group, flags, N, D=D, hidden=hidden)
    outs0, grads0 = grads_of(False, group, flags, N, D=D, hidden=hidden)
    assert_all_close(outs, outs0, 1e-12)
    assert_all_close(grads, grads0, 1e-10)


def lm_cfg(**kw) -> ModelConfig:
    cfg = dict(vocab_size=61, dim=32, depth=2, heads=2, window=8, segment_len=16, chunk_size=8)
    cfg.update(num_persistent=2, num_memory_tokens=2)
    return ModelConfig(**{**cfg, **kw})


def lm_run(variant: str, backend: str, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    runtime = RuntimeConfig(memory_backend=backend, memory_checkpoint_group=2)
    model = TitansLM(lm_cfg(variant=variant, **kw), runtime).to(dtype)
    x = torch.randint(0, 61, (2, 36), generator=torch.Generator().manual_seed(1))
    out = model(x, targets=x)
    loss = out.loss
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), grads


LM_VARIANTS = [
    ("lmm", {}),
    ("mag", dict(memory_depth=1)),  # linear memory
    ("mac", {}),
    pytest.param("mal", dict(memory_per_layer_gates=True, memory_residual_norm=False), marks=SLOW),
    pytest.param(
        "mac", dict(mac_retrieval="memory_tokens", memory_per_layer_gates=True), marks=SLOW
    ),
    pytest.param("lmm", dict(dim=24), marks=SLOW),  # memory head dim 12, hidden 48: padded
]


@pytest.mark.parametrize("variant,kw", LM_VARIANTS)
def test_lm_with_triton_backend_equals_eager(variant, kw, monkeypatch):
    """A tiny TitansLM (head dim 16, or 12 padded to 16; chunk 8, a partial last chunk) trains
    identically on memory_backend=triton and eager: loss and every parameter gradient."""
    mod, launches = kernel(), []
    real = mod.scan_chunks_triton
    spy = lambda *a, **k: launches.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(mod, "scan_chunks_triton", spy)
    loss, grads = lm_run(variant, "triton", **kw)
    assert launches  # the kernel did run
    loss0, grads0 = lm_run(variant, "eager", **kw)
    assert torch.allclose(loss, loss0, rtol=0, atol=1e-12)
    assert len(grads) == len(grads0)
    assert_all_close(grads, grads0, 1e-10)


def test_streaming_with_triton_equals_one_eager_call():
    """NeuralMemory on the kernel, fed in pieces that end mid-chunk (the state's buffer carries
    the partial chunk), equals one eager call over the whole input."""
    torch.manual_seed(0)
    mem = NeuralMemory(32, 2, chunk_size=8, per_layer_gates=True, backend="triton").double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    want, _ = mem(x)
    mem.backend = "eager"
    ref, _ = mem(x)
    mem.backend = "triton"
    state, outs = None, []
    for a, b in ((0, 5), (5, 19), (19, 30)):
        y, state = mem(x[:, a:b], state)
        outs.append(y)
    torch.testing.assert_close(want, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_ops_do_not_grow_with_chunks(group):
    """Issue 14 item 4: on the kernels, forward + backward are three launches per checkpoint
    group (forward; in backward the chunk-start states, then the reverse pass), each over all
    chunks of the group, plus a fixed number of ATen ops per call and per group, whatever the
    chunk count; eager adds ops per chunk. (The interpreter's copies are ATen ops: per launch.)"""
    torch.manual_seed(0)
    mem = NeuralMemory(16, 1, chunk_size=8, backend="triton", checkpoint_group=group)

    def count(T: int, backend: str) -> tuple[int, int]:
        mem.backend, launches = backend, []
        fwd, bwd = kernel(), importlib.import_module(KERNEL_MODULE + "_streamed_bwd")
        x = torch.randn(1, T, 16, requires_grad=True)
        mem(x)[0].sum().backward()  # warm-up (cached masks)
        with pytest.MonkeyPatch.context() as mp:
            for mod, name in (
                (fwd, "_memory_scan_kernel"),
                (bwd, "_memory_scan_streamed_bwd_kernel"),
            ):
                mp.setattr(mod, name, CountedLaunch(getattr(mod, name), launches))
            with OpCounter() as counter:
                mem(x)[0].sum().backward()
        return counter.n, len(launches)

    lengths = (16, 24, 32) if group == 0 else (32, 48, 64)
    (a, na), (b, nb), (c, nc) = (count(T, "triton") for T in lengths)
    if group == 0:  # the whole span in one group: the same ops for 2, 3 and 4 chunks
        assert (na, nb, nc) == (3, 3, 3) and a == b == c
    else:  # a fixed number of launches and ops per group of 2 chunks
        assert (na, nb, nc) == (6, 9, 12) and c - b == b - a
    assert count(32, "eager")[0] > count(16, "eager")[0]


class CountedLaunch:
    """The kernel itself, counting its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


@pytest.mark.slow
@pytest.mark.parametrize("depth,P,rn", CASES)
@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_kernel_sweep(depth, P, rn, chunk):
    """A fuller grid: chunk sizes 8/16/32, G = 3, head dim 32, documents, fp64. Inner steps
    shrink with the chunk (a chunk's summed update at theta 0.3 x 32 tokens diverges to 1e17
    without the residual LayerNorm)."""
    N = 3 * chunk
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(
        G=3, D=32, depth=depth, P=P, N=N, exact_gates=True, lr=2.4 / chunk
    )
    co = span_coeffs(theta, log_eta, log_keep, chunk)
    fl = make_flags(W, 3)
    y, w, s = kernel().scan_chunks_triton(W, S, k, v, q, co, chunk, rn, flags=fl)
    y0, w0, s0 = scan_chunks(W, S, k, v, q, co, chunk, rn, flags=fl)
    assert_all_close([y, *w, *s], [y0, *w0, *s0], 1e-12)


COMPILE = """
import os, subprocess, sys, tempfile
import triton
from titans_train.models.kernels.memory_triton_autograd import compile_for_cuda
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for dims, cap, backward, *tile in {cases}:
    cubin = compile_for_cuda(dims, 16, cap, backward, *tile).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", f.name],
                         capture_output=True, text=True, check=True).stdout
    print(dims, cap, backward, [line.strip() for line in out.splitlines() if "REG:" in line])
"""


def compile_for_cuda(cases: list) -> list[str]:
    """Compiles in a subprocess without TRITON_INTERPRET; one resource-usage line per case."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = COMPILE.format(cases=cases)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(cases), out.stdout
    return lines


def test_kernel_compiles_for_cuda_without_spills():
    """The interpreter does not check what the compiler does (it ran a kernel that read a plain
    float global): compile for sm80 / sm90 with Triton's bundled ptxas, no GPU needed, and check
    that the shapes ``auto`` takes keep their state in registers (no stack) in the forward. The
    depth-1 and the streamed depth-2 backward, which also take the gates' gradients in the
    kernel (coefficients from the gates, as in training), spill a little: 32 and 40 bytes a
    thread (none with loaded coefficients); checked at most 64."""
    cases = [([16, 16], 80, False), ([16, 64, 16], 90, False), ([16, 16], 80, True)]
    cases.append(([13, 13], 90, False))  # a padded width (masks, LayerNorm over 13 of 16)
    cases.append(([16, 64, 16], 90, True, 16))  # the streamed backward (depth 2's)
    lines = compile_for_cuda(cases)
    stacks = [int(line.split("STACK:")[1].split()[0]) for line in lines]
    assert stacks[:2] + stacks[3:4] == [0, 0, 0], lines
    assert stacks[2] <= 64 and stacks[4] <= 64, lines


@pytest.mark.parametrize(
    "D,depth,chunk,match",
    [(16, 3, 8, "depth 3"), (16, 2, 4, "chunk size 4"), (12, 2, 12, "chunk size 12")],
)
def test_unsupported_shapes_name_the_key(D, depth, chunk, match):
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(D=D, depth=depth, N=2 * chunk)
    co = span_coeffs(theta, log_eta, log_keep, chunk)
    with pytest.raises(ValueError, match=f"runtime.memory_backend='triton'.*{match}"):
        kernel().scan_chunks_triton(W, S, k, v, q, co, chunk, True)


def test_backend_selection(monkeypatch):
    """triton is accepted when it imports; refused naming the key when it does not; ``auto``
    on CUDA picks the kernel only for shapes it takes with the state in registers."""
    assert RuntimeConfig(memory_backend="triton").memory_backend == "triton"
    assert runtime_mod.resolve_memory_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.setattr(runtime_mod, "_inductor_on_cuda", lambda: True)  # as on a CUDA host
    cuda = torch.device("cuda")
    assert runtime_mod.resolve_memory_backend("auto", cuda, [16, 64, 16], 16) == "triton"
    assert runtime_mod.resolve_memory_backend("auto", cuda, [64, 256, 64], 16) == "compile"
    assert runtime_mod.resolve_memory_backend("auto", cuda, [16, 64, 64, 16], 16) == "compile"
    assert runtime_mod.resolve_memory_backend("auto", cuda, [24, 96, 24], 16) == "compile"
    # Widths that are not powers of two count at their padded blocks: 24 / 48 holds 32 / 64
    # (8,192 state values, as 32 / 64 does); the 170M preset's 48 / 192 holds 64 / 256.
    assert runtime_mod.resolve_memory_backend("auto", cuda, [24, 48, 24], 16) == "triton"
    assert runtime_mod.resolve_memory_backend("auto", cuda, [13, 13], 16) == "triton"
    assert runtime_mod.resolve_memory_backend("auto", cuda, [48, 192, 48], 16) == "compile"
    assert runtime_mod.resolve_memory_backend("auto", cuda) == "compile"
    monkeypatch.setitem(sys.modules, "triton", None)  # what an install without triton looks like
    with pytest.raises(ValueError, match="runtime.memory_backend='triton': triton is not inst"):
        RuntimeConfig(memory_backend="triton")
    assert runtime_mod.resolve_memory_backend("auto", cuda, [16, 64, 16], 16) == "compile"
    model = TitansLM(lm_cfg(variant="lmm"))  # CPU users without triton: auto = eager
    x = torch.randint(0, 61, (1, 20))
    model(x, targets=x).loss.backward()


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_packed_documents_on_triton_equal_eager_and_each_document_alone(variant):
    """Issue 13 on the kernel: document resets (DocFlags) inside the fused scan give eager's
    loss and gradients, and each packed document's logits equal the document run alone."""
    starts = torch.zeros(2, 36, dtype=torch.bool)
    starts[0, [9, 16, 17]] = True
    starts[1, [20]] = True
    x = torch.randint(0, 61, (2, 36), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("triton", "eager"):
        torch.manual_seed(0)
        runtime = RuntimeConfig(memory_backend=backend, memory_checkpoint_group=2)
        model = TitansLM(lm_cfg(variant=variant), runtime).double()
        out = model(x, targets=x, doc_starts=starts)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[backend] = (out.loss.detach(), grads, model, out.logits.detach())
    loss, grads, model, logits = results["triton"]
    assert torch.allclose(loss, results["eager"][0], rtol=0, atol=1e-12)
    assert_all_close(grads, results["eager"][1], 1e-10)
    with torch.no_grad():
        for b, cuts in ((0, [0, 9, 16, 17, 36]), (1, [0, 20, 36])):
            for a, e in zip(cuts[:-1], cuts[1:]):
                alone = model(x[b : b + 1, a:e]).logits
                torch.testing.assert_close(logits[b : b + 1, a:e], alone, rtol=0, atol=1e-10)
