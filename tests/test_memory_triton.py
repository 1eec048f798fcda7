"""The fused Triton kernel of the memory's chunk loop (issue 14) against the eager scan, run on CPU
by Triton's interpreter (TRITON_INTERPRET=1, set before the kernel module is first imported).

Triton is in the dev extra, so these tests run in CI; nothing here is skipped."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans_train.models import ModelConfig, NeuralMemory, RuntimeConfig, TitansLM
from titans_train.models import runtime as runtime_mod
from titans_train.models.memory_math import DocFlags, scan_chunks, span_coeffs
from titans_train.models.memory_scan import memory_scan

KERNEL_MODULE = "titans_train.models.kernels.memory_triton"


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


def make_inputs(G=2, D=16, depth=2, P=1, N=24, dt=torch.float64, seed=0, exact_gates=False, lr=0.3):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dt)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    dims = [D] + [4 * D] * (depth - 1) + [D]
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


def grads_of(triton, group, flags, N, P=1, depth=2):
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(depth=depth, P=P, N=N)
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
    "group,flags,N",
    [(0, False, 24), (2, True, 29)],  # one span / checkpoint groups, documents, a partial chunk
)
def test_training_path_gradients_equal_eager(group, flags, N):
    """memory_scan(triton=True): outputs and gradients wrt M, S, k, v, q, the gates and M_0 equal
    the eager path's (the backward recomputes eagerly)."""
    outs, grads = grads_of(True, group, flags, N)
    outs0, grads0 = grads_of(False, group, flags, N)
    assert_all_close(outs, outs0, 1e-12)
    assert_all_close(grads, grads0, 1e-10)


def test_recompute_is_eager_on_cpu():
    """On CPU the backward's recompute is the eager loop, so the gradients above are eager's (on
    CUDA it is the compiled chunk step, checked against eager by the GPU smoke's stage 3)."""
    assert not kernel().recompute_compiled(torch.zeros(1))


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
    ("mal", dict(memory_per_layer_gates=True, memory_residual_norm=False)),
    ("mac", dict(mac_retrieval="memory_tokens", memory_per_layer_gates=True)),
]


@pytest.mark.parametrize("variant,kw", LM_VARIANTS)
def test_lm_with_triton_backend_equals_eager(variant, kw, monkeypatch):
    """A tiny TitansLM (head dim 16, chunk 8, a partial last chunk) trains identically on
    memory_backend=triton and eager: loss and every parameter gradient."""
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


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("group", [0, 2])
def test_forward_ops_do_not_grow_with_chunks(group):
    """Issue 14 item 4: on the kernel, a forward is one launch per checkpoint group (all chunks of
    the group in it) plus a fixed number of ATen ops per call and per group, whatever the chunk
    count; eager adds ops per chunk. (The interpreter's copies are ATen ops too: per launch.)"""
    torch.manual_seed(0)
    mem = NeuralMemory(32, 2, chunk_size=8, backend="triton", checkpoint_group=group)

    def count(T: int, backend: str) -> tuple[int, int]:
        mem.backend, launches = backend, []
        mod = kernel()
        real = mod._memory_scan_kernel
        x = torch.randn(1, T, 32, requires_grad=True)
        mem(x)  # warm-up (cached masks)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mod, "_memory_scan_kernel", CountedLaunch(real, launches))
            with OpCounter() as counter:
                mem(x)
        return counter.n, len(launches)

    (a, na), (b, nb), (c, nc) = (count(T, "triton") for T in (32, 48, 64))
    if group == 0:  # the whole span in one launch: the same ops for 4, 6 and 8 chunks
        assert (na, nb, nc) == (1, 1, 1) and a == b == c
    else:  # one launch and a fixed number of ops per group of 2 chunks
        assert (na, nb, nc) == (2, 3, 4) and c - b == b - a
    assert count(32, "eager")[0] > count(16, "eager")[0]


class CountedLaunch:
    """The kernel itself, counting its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_bf16_model_runs_the_kernel_in_fp32():
    """bf16 parameters: the memory upcasts to fp32 before the kernel (fp32 state), so triton and
    eager differ only by fp32 rounding inside the loop (measured: loss equal, gradients 2e-5)."""
    loss, grads = lm_run("lmm", "triton", torch.bfloat16)
    loss0, grads0 = lm_run("lmm", "eager", torch.bfloat16)
    assert torch.isfinite(loss) and abs(loss.float() - loss0.float()) <= 1e-3
    for g, g0 in zip(grads, grads0):
        assert (g.float() - g0.float()).norm() <= 1e-3 * g0.float().norm().clamp_min(1e-6)


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
from titans_train.models.kernels.memory_triton import compile_for_cuda
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for dims, cap in (([16, 16], 80), ([16, 64, 16], 90)):
    cubin = compile_for_cuda(dims, 16, cap).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", f.name],
                         capture_output=True, text=True, check=True).stdout
    print(dims, cap, [line.strip() for line in out.splitlines() if "REG:" in line])
"""


def test_kernel_compiles_for_cuda_without_spills():
    """The interpreter does not check what the compiler does (it ran a kernel that read a plain
    float global): compile for sm80 / sm90 with Triton's bundled ptxas, no GPU needed, and check
    that the shapes ``auto`` takes keep their state in registers (no stack)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("STACK:0 " in line for line in lines), out.stdout


@pytest.mark.parametrize(
    "D,depth,chunk,match",
    [(12, 2, 8, "widths"), (16, 3, 8, "depth 3"), (16, 2, 4, "chunk size 4")],
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
    assert runtime_mod.resolve_memory_backend("auto", cuda) == "compile"
    monkeypatch.setitem(sys.modules, "triton", None)  # what an install without triton looks like
    with pytest.raises(ValueError, match="runtime.memory_backend='triton': triton is not inst"):
        RuntimeConfig(memory_backend="triton")
    assert runtime_mod.resolve_memory_backend("auto", cuda, [16, 64, 16], 16) == "compile"
    model = TitansLM(lm_cfg(variant="lmm"))  # CPU users without triton: auto = eager
    x = torch.randint(0, 61, (1, 20))
    model(x, targets=x).loss.backward()
