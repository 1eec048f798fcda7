"""The in-process stages of gpu_smoke.py: memory (3), whole model (4), throughput (6).

Each stage takes a ``Smoke`` (device, dry run, output dir) and returns a dict with ``ok`` and its
numbers; ``summary`` is the one line the table prints. Sizes are real on CUDA and tiny on the
CPU dry run, which checks the wiring, not the GPU numbers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from titans_train.models import ModelConfig, RuntimeConfig, TitansLM, memory_math
from titans_train.models import memory as memory_mod
from titans_train.models.attention import dispatch as attention_mod
from titans_train.models.attention import select_backend
from titans_train.models.blocks import make_memory
from titans_train.models.kernels import triton_importable

ROOT = Path(__file__).resolve().parents[1]

# Every memory backend (runtime.memory_backend); each is checked against "eager" (stage 3) and
# timed (stage 6).
MEMORY_BACKENDS: list[str] = ["eager", "compile"]
# The fused kernel (issue 14), when Triton imports: a real launch on CUDA, Triton's interpreter
# on the dry run (gpu_smoke.set_environment sets TRITON_INTERPRET=1). It runs at memory head dim 16
# (``kernel_heads``: the state fits its registers), next to an eager run of the same shape
# ("eager_kernel_shape") as its reference and its speed baseline; on a GPU also at the preset's own
# head dim ("triton_preset_shape": 48 at 170M, padded to 64, the streamed kernels), to be compared
# with "compile", which `auto` picks there today (docs/memory.md, "The fused Triton kernel").
KERNEL_HEAD_DIM = 16
if triton_importable():
    MEMORY_BACKENDS.append("triton")


def kernel_heads(dim: int) -> int:
    return dim // KERNEL_HEAD_DIM


# Stage 4: every variant, both MAC retrieval modes.
VARIANTS: dict[str, dict] = {
    "mac": {"variant": "mac", "mac_retrieval": "per_token"},
    "mac_memory_tokens": {"variant": "mac", "mac_retrieval": "memory_tokens"},
    "mag": {"variant": "mag"},
    "mal": {"variant": "mal"},
    "lmm": {"variant": "lmm"},
    "transformer": {"variant": "transformer"},
}

# Relative L2 errors allowed. bf16 rows: measured with bf16 parameters on CPU (SDPA) at these
# sizes, then given ~3x headroom; fp32 rows bound the dry run.
TOL = {
    "bf16": {"vs_fp64": 3e-2, "grad": 6e-2, "backend": 2e-2, "logits": 5e-2, "stream": 3e-2},
    "fp32": {"vs_fp64": 1e-4, "grad": 1e-4, "backend": 1e-4, "logits": 1e-5, "stream": 1e-4},
}


@dataclass
class Smoke:
    device: torch.device
    dry_run: bool
    out: Path

    @property
    def dtype(self) -> torch.dtype:  # what training uses: bf16 parameters on CUDA
        return torch.float32 if self.dry_run else torch.bfloat16

    @property
    def tol(self) -> dict[str, float]:
        return TOL["fp32" if self.dry_run else "bf16"]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 on CPU (inf if got is not finite)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(g).all():
        return math.inf
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


@contextlib.contextmanager
def dry_run_compile(dry_run: bool):
    """On the dry run, the compiled memory step is traced by dynamo but not code-generated
    (inductor needs ~1-2 min of CPU per graph); on CUDA it is the real torch.compile."""
    if not dry_run:
        yield
        return
    if not hasattr(memory_math, "_COMPILED_STEP"):
        raise RuntimeError("memory_math._COMPILED_STEP is gone: update gpu_smoke_stages.py")
    saved = memory_math._COMPILED_STEP
    memory_math._COMPILED_STEP = torch.compile(
        memory_math.chunk_step, backend="eager", dynamic=False
    )
    try:
        yield
    finally:
        memory_math._COMPILED_STEP = saved


# -- stage 3: memory ---------------------------------------------------------------------------
def memory_config(smoke: Smoke, **overrides) -> ModelConfig:
    size = dict(dim=32, heads=2, chunk_size=8)
    if not smoke.dry_run:
        # The 170M presets' memory (16 heads of 48; batch 1 below): stage 6 can reuse the
        # inductor cache of these graphs.
        size = dict(dim=768, heads=16, chunk_size=16)
    base = dict(variant="lmm", vocab_size=64, depth=1, num_persistent=0)
    return ModelConfig(**{**base, **size, **overrides})


def runtime(smoke: Smoke, memory_backend: str = "auto") -> RuntimeConfig:
    """Stages 3 and 4: checkpoint groups of 2 chunks (4 on a GPU), so a pass crosses several."""
    return RuntimeConfig(
        memory_backend=memory_backend, memory_checkpoint_group=4 - 2 * smoke.dry_run
    )


def run_memory(module, x: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, final memory weights and the input gradient of sum(out * weight)."""
    x = x.detach().requires_grad_()
    out, state = module(x)
    (out.to(weight.dtype) * weight).sum().backward()
    return {"out": out.detach(), "weights": torch.cat([w.flatten() for w in state.weights]),
            "grad": x.grad}  # fmt: skip


def memory_stage(smoke: Smoke) -> dict:
    """bf16 parameters on the device against fp64 on CPU; every backend against eager.

    Parameters and input are rounded to the tested dtype first, so the errors measure the
    computation, not the rounding of the input. 16 chunks: over ~64 chunks of random input the
    recurrence amplifies bf16 rounding of q, k, v into O(1) input-gradient differences (fp32: 3e-4).
    The fused kernel runs in its own pass at head dim 16, against an eager run of that shape.
    """
    B, T = (2, 69) if smoke.dry_run else (1, 261)  # a ragged tail: a partial last chunk
    names = [n for n in MEMORY_BACKENDS if n != "triton"]
    passes = [(names, {}, {})]
    if "triton" in MEMORY_BACKENDS:
        heads = kernel_heads(memory_config(smoke).dim)
        passes.append((["eager", "triton"], {"heads": heads}, {"eager": "eager_kernel_shape"}))
    details = {"shape": [B, T, memory_config(smoke).dim], "dtype": str(smoke.dtype), "backends": {}}
    failures = []
    with dry_run_compile(smoke.dry_run):
        for names, shape, rename in passes:
            rows, bad = compare_memory_backends(smoke, B, T, names, shape)
            details["backends"].update({rename.get(n, n): r for n, r in rows.items()})
            failures += bad
    worst = max(r["out_vs_fp64"] for r in details["backends"].values())
    summary = f"{len(details['backends'])} backends, worst out err vs fp64 {worst:.2g}"
    return {"ok": not failures, "failures": failures, "summary": summary, **details}


def compare_memory_backends(
    smoke: Smoke, B: int, T: int, names: list[str], shape: dict
) -> tuple[dict, list[str]]:
    """Rows (errors vs fp64 and vs this pass's eager) and failures of one memory shape."""
    torch.manual_seed(0)
    ref = make_memory(memory_config(smoke, **shape), runtime(smoke, "eager"))
    ref = ref.to(smoke.dtype).double()
    x = torch.randn(B, T, ref.dim).to(smoke.dtype).double()
    weight = torch.randn(B, T, ref.dim, dtype=torch.float64)
    want = run_memory(ref, x, weight)
    runs, tol, failures, rows = {}, smoke.tol, [], {}
    for name in names:
        mod = make_memory(memory_config(smoke, **shape), runtime(smoke, name))
        mod.load_state_dict(ref.state_dict())
        mod.to(smoke.device, smoke.dtype)
        t0, graphs = time.perf_counter(), compiled_graphs()
        runs[name] = run_memory(mod, x.to(smoke.device, smoke.dtype), weight.to(smoke.device))
        smoke.sync()
        runs[name]["seconds"] = time.perf_counter() - t0
        runs[name]["graphs"] = compiled_graphs() - graphs
    for name, got in runs.items():
        row = {f"{k}_vs_fp64": rel_err(got[k], want[k]) for k in ("out", "weights", "grad")}
        row.update(first_call_seconds=got["seconds"], new_compiled_graphs=got["graphs"])
        row["memory_heads"] = ref.heads
        if name != "eager":
            row.update(
                {f"{k}_vs_eager": rel_err(got[k], runs["eager"][k]) for k in ("out", "grad")}
            )
        rows[name] = row
        limits = {"out_vs_fp64": tol["vs_fp64"], "weights_vs_fp64": tol["vs_fp64"],
                  "grad_vs_fp64": tol["grad"], "out_vs_eager": tol["backend"],
                  "grad_vs_eager": tol["backend"]}  # fmt: skip
        failures += [f"{name}: {k}={row[k]:.3g} > {v}" for k, v in limits.items()
                     if k in row and not row[k] <= v]  # fmt: skip
    return rows, failures


# -- stage 4: whole model ----------------------------------------------------------------------
def model_config(smoke: Smoke, overrides: dict) -> ModelConfig:
    size = dict(vocab_size=64, dim=32, depth=1, heads=2, window=16, segment_len=16, chunk_size=8,
                num_persistent=2, num_memory_tokens=4)  # fmt: skip
    if not smoke.dry_run:  # head dim 64, several MAC segments and windows
        size = dict(vocab_size=512, dim=256, depth=2, heads=4, window=128, segment_len=128,
                    chunk_size=16, num_persistent=8, num_memory_tokens=16)  # fmt: skip
    return ModelConfig(**{**size, **overrides})


ATTENTION_ENTRIES = {"flash": "merge_attend", "flex": "flex_attend", "sdpa": "_sdpa_attend"}


@contextlib.contextmanager
def count_attention():
    """Counts the calls of each backend's entry in models/attention/dispatch.py during the block."""
    calls = dict.fromkeys(ATTENTION_ENTRIES, 0)
    saved = {}
    for backend, name in ATTENTION_ENTRIES.items():
        fn = getattr(attention_mod, name, None)
        if fn is None:
            raise RuntimeError(f"models/attention/dispatch.py has no {name}: update the entries")
        saved[name] = fn

        def counted(*args, _fn=fn, _backend=backend, **kwargs):
            calls[_backend] += 1
            return _fn(*args, **kwargs)

        setattr(attention_mod, name, counted)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(attention_mod, name, fn)


def check_variant(smoke: Smoke, cfg: ModelConfig, B: int, T: int) -> dict:
    torch.manual_seed(0)
    ref = (
        TitansLM(cfg, runtime=runtime(smoke)).to(smoke.dtype).float()
    )  # fp32 on CPU, from the tested dtype's weights
    tokens = torch.randint(cfg.vocab_size, (B, T + 1))
    with torch.no_grad():
        want = ref(tokens[:, :-1]).logits
        # The same dtype on CPU (SDPA): how far this dtype alone moves this variant's logits.
        cpu_same = copy.deepcopy(ref).to(smoke.dtype)(tokens[:, :-1]).logits
    model = copy.deepcopy(ref).to(smoke.device, smoke.dtype)
    inp, tgt = tokens[:, :-1].to(smoke.device), tokens[:, 1:].to(smoke.device)
    if smoke.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(smoke.device)
    with count_attention() as calls:
        out = model(inp, tgt)
        out.loss.backward()
    smoke.sync()
    with torch.no_grad():  # streaming: a split off every chunk/segment boundary
        s = T // 2 + 3
        first = model(inp[:, :s])
        second = model(inp[:, s:], state=first.state)
    streamed = torch.cat([first.logits, second.logits], dim=1)
    probe = torch.empty(1, cfg.heads, 1, cfg.head_dim, device=smoke.device, dtype=smoke.dtype)
    expected = None if cfg.variant == "lmm" else select_backend(probe)
    row = {
        "loss": out.loss.item(),
        "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()
                            if p.grad is not None),  # fmt: skip
        "logits_vs_cpu_fp32": rel_err(out.logits, want),
        "cpu_same_dtype_vs_cpu_fp32": rel_err(cpu_same, want),
        "stream_vs_one_call": rel_err(streamed, out.logits),
        "attention_calls": calls,
        "expected_backend": expected,
        "peak_memory_gb": torch.cuda.max_memory_allocated(smoke.device) / 2**30
        if smoke.device.type == "cuda" else None,
    }  # fmt: skip
    used = sum(calls.values())
    if expected is None:
        row["backend_ok"] = used == 0
    else:
        row["backend_ok"] = calls[expected] > 0 and calls[expected] == used
    return row


def model_stage(smoke: Smoke) -> dict:
    """Every variant: finite loss and grads, the expected attention backend, logits against CPU
    fp32 (bound: a fixed tolerance or twice the same dtype's error on CPU, whichever is larger),
    streaming (state carried over two calls) against one call, peak memory."""
    B, T = (1, 48) if smoke.dry_run else (2, 512)
    rows, failures = {}, []
    for name, overrides in VARIANTS.items():
        row = rows[name] = check_variant(smoke, model_config(smoke, overrides), B, T)
        # MAC at init is ~400x more sensitive to rounding than Transformer++ (fp32 vs fp64 on
        # CPU: 2e-4 vs 5e-7; bf16: 0.2 vs 0.006), so the bound is relative to the same dtype on
        # CPU: the device path may not be much worse than bf16 itself is.
        tol = dict(
            smoke.tol, logits=max(smoke.tol["logits"], 2 * row["cpu_same_dtype_vs_cpu_fp32"])
        )
        checks = {
            "finite loss": math.isfinite(row["loss"]),
            "finite grads": row["grads_finite"],
            f"attention calls {row['attention_calls']} not all {row['expected_backend']}":
                row["backend_ok"],
            f"logits err {row['logits_vs_cpu_fp32']:.3g} > {tol['logits']}":
                row["logits_vs_cpu_fp32"] <= tol["logits"],
            f"stream err {row['stream_vs_one_call']:.3g} > {tol['stream']}":
                row["stream_vs_one_call"] <= tol["stream"],
        }  # fmt: skip
        failures += [f"{name}: {what}" for what, good in checks.items() if not good]
    backends = sorted({r["expected_backend"] for r in rows.values() if r["expected_backend"]})
    worst = max(r["logits_vs_cpu_fp32"] for r in rows.values())
    summary = f"{len(rows)} variants, attention {'/'.join(backends)}, worst logits err {worst:.2g}"
    return {"ok": not failures, "failures": failures, "summary": summary, "shape": [B, T],
            "variants": rows}  # fmt: skip


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# -- stage 6: throughput -----------------------------------------------------------------------
@contextlib.contextmanager
def time_memory_scan(smoke: Smoke):
    """Total seconds spent inside memory_scan.memory_scan (the inner loop) during the block:
    CUDA events on GPU (no extra synchronisation), wall clock on CPU."""
    spans, original = [], memory_mod.memory_scan
    cuda = smoke.device.type == "cuda"

    def timed(*args, **kwargs):
        start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            start.record()
        result = original(*args, **kwargs)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            spans.append((start, end))
        else:
            spans.append(time.perf_counter() - start)
        return result

    total = {"seconds": 0.0}
    memory_mod.memory_scan = timed
    try:
        yield total
    finally:
        memory_mod.memory_scan = original
        smoke.sync()
        total["seconds"] = sum(s.elapsed_time(e) / 1e3 for s, e in spans) if cuda else sum(spans)


def time_model(smoke: Smoke, model: TitansLM, T: int, iters: int) -> dict:
    """Training throughput (forward + backward, batch 1) and the inner loop's share of a forward."""
    from titans_train.metrics import peak_flops_per_device
    from titans_train.models.flops import flops_per_token

    tokens = torch.randint(model.cfg.vocab_size, (1, T + 1), device=smoke.device)
    if smoke.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(smoke.device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        return out.loss.item()

    t0 = time.perf_counter()
    loss = step()  # warm-up: compiles, autotunes, allocator
    smoke.sync()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    smoke.sync()
    seconds = (time.perf_counter() - t0) / iters
    with time_memory_scan(smoke) as inner:
        t0 = time.perf_counter()
        model(tokens[:, :-1], tokens[:, 1:])
        smoke.sync()
        forward = time.perf_counter() - t0
    peak, peak_source = peak_flops_per_device()
    tokens_per_second = T / seconds
    flops = 3 * flops_per_token(model.cfg, T)["total"]
    return {
        "loss": loss,
        "warmup_seconds": warmup,
        "step_seconds": seconds,
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops / peak if peak else None,
        "peak_source": peak_source,
        "memory_scan_share_of_forward": inner["seconds"] / forward if forward else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(smoke.device) / 2**30
        if smoke.device.type == "cuda" else None,
    }  # fmt: skip


def throughput_stage(smoke: Smoke) -> dict:
    """The 170M MAC preset at 2K and 4K tokens for every memory backend (tiny preset at 64 tokens
    on the dry run: a second length only added a second CPU compile of every compiled graph)."""
    from titans_train.config_load import load_model_config

    preset = "tiny" if smoke.dry_run else "mac_170m"
    lengths, iters = ((64,), 1) if smoke.dry_run else ((2048, 4096), 2)
    rows, failures = {}, []
    path = ROOT / "configs" / "model" / f"{preset}.yaml"
    # name -> (runtime.memory_backend, model overrides)
    runs = {n: (n, []) for n in MEMORY_BACKENDS if n != "triton"}
    if "triton" in MEMORY_BACKENDS:  # the kernel at head dim 16, and eager at that shape
        heads = [f"memory_heads={kernel_heads(load_model_config(path).dim)}"]
        runs["eager_kernel_shape"] = ("eager", heads)
        runs["triton"] = ("triton", heads)
        if not smoke.dry_run:  # too slow for the interpreter
            runs["triton_preset_shape"] = ("triton", [])
    with dry_run_compile(smoke.dry_run):
        for backend, (memory_backend, dotlist) in runs.items():
            cfg = load_model_config(path, dotlist)
            torch.manual_seed(0)
            model = TitansLM(cfg, runtime=RuntimeConfig(memory_backend=memory_backend))
            model = model.to(smoke.device, smoke.dtype)
            for T in lengths:
                graphs = compiled_graphs()
                row = rows[f"{backend}@{T}"] = time_model(smoke, model, T, iters)
                row["new_compiled_graphs"] = compiled_graphs() - graphs
                if not math.isfinite(row["loss"]):
                    failures.append(f"{backend}@{T}: loss {row['loss']}")
            del model
            if smoke.device.type == "cuda":
                torch.cuda.empty_cache()
    mfu = {k: f" {r['mfu']:.1%} MFU" if r["mfu"] else "" for k, r in rows.items()}
    parts = [f"{k} {r['tokens_per_second']:.0f} tok/s{mfu[k]}" for k, r in rows.items()]
    return {"ok": not failures, "failures": failures, "summary": ", ".join(parts),
            "preset": preset, "runs": rows}  # fmt: skip
