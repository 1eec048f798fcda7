"""NeuralMemory and MAC speed / peak memory on CPU, side by side with references, as JSON lines.

    python benchmarks/bench_memory.py [--quick] [--out FILE]
    python benchmarks/bench_memory.py --smoke --out FILE    # each kind once, tiny T, 1 thread (CI)

Every measurement runs in its own subprocess (2 threads) so peak RSS is its own. Measured:
  memory      our NeuralMemory fwd+bwd at dim 256, 4 heads, b=16, batch 2, T = 1K..16K
              (with and without chunk-group checkpointing); cost per token should be flat
  naive       the per-token reference loop (eqs. 13-14 with autograd.grad) at small T
  mac         our MAC (memory in every layer, paper semantics; eager and `compile`) vs
              titans-pytorch's MemoryAsContextTransformer when installed
              (`pip install titans-pytorch torch==2.13.0`): its default mode, and the paper's
              semantics (memory every layer, chunk 16, neural_memory_batch_size=16), capped at
              12 GB of address space; and ours with per-block activation checkpointing
              (`runtime.activation_checkpointing: true`, impl ours-ac)
Each row also gives the child's CPU seconds per step (``cpu_seconds``): on a shared machine,
compare arms by it rather than by wall time.

    python benchmarks/bench_memory.py --mac --lengths 1024,4096   # only the MAC arms
    python benchmarks/bench_memory.py --mac --malloc jemalloc   # children on another allocator

``--malloc jemalloc|tcmalloc`` preloads that allocator into every child (LD_PRELOAD; Debian:
libjemalloc2 or libtcmalloc-minimal4), as PyTorch's performance tuning guide suggests for CPU
work: glibc keeps much of what the many short-lived tensors free, so peak RSS is well above the
live tensors' peak. Each row names the allocator its child ran on (``malloc``, read from
/proc/self/maps).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAC = dict(vocab=256, dim=256, depth=4, heads=4, segment=128)


CPU_SECONDS: list[float] = []  # per timed repeat, read by child()


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    CPU_SECONDS.clear()
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        CPU_SECONDS.append(time.process_time() - c0)
    return sorted(times)[len(times) // 2]


def run_memory(T: int, group: int, repeats: int, compiled: int = 0) -> dict:
    import torch

    from titans_train.models import NeuralMemory

    torch.manual_seed(0)
    backend = "compile" if compiled else "eager"
    mem = NeuralMemory(256, 4, chunk_size=16, checkpoint_group=group, backend=backend)
    x = torch.randn(2, T, 256, requires_grad=True)

    def step():
        out, _ = mem(x)
        out.sum().backward()

    seconds = timed(step, repeats)
    return dict(seconds=seconds, tokens=2 * T, **flop_utilisation(2 * T, seconds))


def flop_utilisation(tokens: int, seconds: float) -> dict:
    """The memory's useful FLOPs (``models.flops.memory_flops``, analytic: projections, conv,
    gates and the inner loop, no recompute; training = 3x forward) per second, as a share of
    this process's measured fp32 matmul rate at the same thread count."""
    from titans_train.metrics import measured_cpu_flops
    from titans_train.models import ModelConfig
    from titans_train.models.flops import memory_flops

    cfg = ModelConfig(variant="lmm", dim=256, heads=4, chunk_size=16, memory_depth=2)
    useful = 3 * memory_flops(cfg) * tokens / seconds
    rate = measured_cpu_flops()
    return dict(
        useful_gflops=useful / 1e9, matmul_gflops=rate / 1e9, flop_utilisation=useful / rate
    )


def run_naive(T: int, repeats: int) -> dict:
    """The test-suite reference: a Python loop over tokens, autograd.grad at the chunk start."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import naive_memory

    g = torch.Generator().manual_seed(0)
    G, d = 8, 64  # batch 2 x 4 heads, head dim 64: the same inner problem as `memory`
    W = [torch.randn(G, d, 4 * d, generator=g) / 8, torch.randn(G, 4 * d, d, generator=g) / 16]
    S = [torch.zeros_like(w) for w in W]
    k = F.normalize(torch.randn(G, T, d, generator=g), dim=-1).requires_grad_()
    q = F.normalize(torch.randn(G, T, d, generator=g), dim=-1)
    v = torch.randn(G, T, d, generator=g)
    gates = [0.1 * torch.ones(G, T, 1), 0.9 * torch.ones(G, T, 1), 0.99 * torch.ones(G, T, 1)]

    def step():  # forward only: its gradient path needs create_graph through every token
        naive_memory(W, S, k, v, q, *gates, 16, True)

    return dict(seconds=timed(step, repeats), tokens=2 * T, forward_only=True)


def run_mac(impl: str, T: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    tokens = torch.randint(0, MAC["vocab"], (2, T + 1))
    if impl.startswith("ours"):
        from titans_train.models import ModelConfig, RuntimeConfig, TitansLM
        from titans_train.models.runtime import apply_activation_checkpointing

        cfg = ModelConfig(
            variant="mac",
            vocab_size=MAC["vocab"],
            dim=MAC["dim"],
            depth=MAC["depth"],
            heads=MAC["heads"],
            segment_len=MAC["segment"],
            chunk_size=16,
            num_persistent=4,
        )
        runtime = RuntimeConfig(memory_backend="compile" if impl == "ours-compiled" else "eager")
        model = TitansLM(cfg, runtime=runtime)
        if impl == "ours-ac":  # what the trainer does for runtime.activation_checkpointing
            apply_activation_checkpointing(model)

        def step():
            model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()

    else:
        from titans_pytorch import MemoryAsContextTransformer

        paper = impl == "titans-pytorch-paper"
        model = MemoryAsContextTransformer(
            num_tokens=MAC["vocab"],
            dim=MAC["dim"],
            depth=MAC["depth"],
            heads=MAC["heads"],
            dim_head=MAC["dim"] // MAC["heads"],
            segment_len=MAC["segment"],
            num_persist_mem_tokens=4,
            num_longterm_mem_tokens=4,
            num_residual_streams=1,
            neural_memory_layers=None if paper else (2, 4),
            neural_memory_segment_len=16 if paper else None,
            neural_memory_batch_size=16 if paper else None,
        )

        def step():
            model(tokens, return_loss=True).backward()

    n_params = sum(p.numel() for p in model.parameters())
    return dict(seconds=timed(step, repeats), tokens=2 * T, params=n_params)


def child(kind: str, args: list[str]) -> None:
    """Runs inside the subprocess: one measurement, one JSON line, plus peak RSS."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # measure() sets it
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "memory":
        out = run_memory(*map(int, args))
    elif kind == "naive":
        out = run_naive(int(args[0]), int(args[1]))
    else:
        out = run_mac(args[0], int(args[1]), int(args[2]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["cpu_seconds"] = sorted(CPU_SECONDS)[len(CPU_SECONDS) // 2] if CPU_SECONDS else None
    out.update(peak_rss_gb=peak / 1e6, peak_above_start_gb=(peak - base) / 1e6)
    maps = Path("/proc/self/maps")
    out["malloc"] = loaded_malloc(maps.read_text()) if maps.is_file() else "unknown"
    print("RESULT " + json.dumps(out), flush=True)


MALLOCS = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc", "tcmalloc_minimal")}


def malloc_library(name: str) -> str | None:
    """--malloc NAME -> the shared library to preload (None for glibc's own malloc)."""
    if name == "glibc":
        return None
    if name not in MALLOCS:
        raise SystemExit(f"bench_memory: --malloc {name!r}: expected glibc, jemalloc or tcmalloc")
    for lib in MALLOCS[name]:
        found = ctypes.util.find_library(lib)
        if found:
            return found
    raise SystemExit(
        f"bench_memory: --malloc {name}: no lib{MALLOCS[name][0]} on this machine "
        "(Debian/Ubuntu: apt-get install libjemalloc2 or libtcmalloc-minimal4)"
    )


def loaded_malloc(maps: str) -> str:
    """The allocator a process runs on, from its /proc/self/maps text."""
    for name in MALLOCS:
        if f"lib{name}" in maps:
            return name
    return "glibc"


def measure(
    kind: str,
    *args,
    cap_gb: float | None = None,
    timeout: int = 3600,
    threads: int = 2,
    malloc: str | None = None,
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if malloc:
        env["LD_PRELOAD"] = malloc
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    if cap_gb:
        cap = int(cap_gb * 2**30)
        cmd = ["prlimit", f"--as={cap}", *cmd]
    row = dict(kind=kind, args=list(map(str, args)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timeout after {timeout}s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            res["us_per_token"] = 1e6 * res["seconds"] / res["tokens"]
            return dict(row, **res)
    err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    return dict(row, error=err[0][:300])


# --smoke: each kind once at a tiny length, one timed repeat (T=32: 2 chunks, 1 group of 2)
SMOKE = [
    ("memory", 32, 0, 1, 0),
    ("memory", 32, 2, 1, 0),
    ("naive", 16, 1),
    ("mac", "ours", 32, 1),
    ("mac", "ours-ac", 32, 1),
]


def plan(
    quick: bool, skip_titans: bool, mac_only: bool = False, mac_lengths: list[int] | None = None
) -> list[tuple]:
    """The measurements: (kind, *args of the child)."""
    reps = 2 if quick else 3
    lengths = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    jobs = [("memory", T, g, reps, c) for g, c in ((0, 0), (16, 0), (0, 1)) for T in lengths]
    jobs += [("naive", T, 1) for T in (128, 256)]
    jobs += [("memory", T, 0, reps, 0) for T in (128, 256)]
    if mac_only:
        jobs = []
    mac_lengths = mac_lengths or [256, 1024, 4096]
    impls = ("ours", "ours-ac") if mac_only else ("ours", "ours-ac", "ours-compiled")
    jobs += [("mac", impl, T, reps) for T in mac_lengths for impl in impls]
    try:
        import titans_pytorch  # noqa: F401

        have_titans = not skip_titans
    except ImportError:
        have_titans = False
    if have_titans:
        ref = [T for T in mac_lengths if T >= 1024]
        jobs += [("mac", "titans-pytorch-default", T, reps) for T in ref]
        if not mac_only:
            jobs += [("mac", "titans-pytorch-paper", 256, 1)]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    ap.add_argument("--smoke", action="store_true", help="each kind once, tiny T, 1 thread (CI)")
    ap.add_argument("--out", type=Path, help="also write the JSON lines here")
    ap.add_argument("--skip-titans", action="store_true")
    ap.add_argument("--mac", action="store_true", help="only the MAC arms (no compile arm)")
    ap.add_argument("--lengths", help="MAC lengths, comma-separated (default 256,1024,4096)")
    ap.add_argument(
        "--malloc", default="glibc", help="glibc (default), jemalloc or tcmalloc: see above"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    rows, malloc = [], malloc_library(args.malloc)
    lengths = [int(t) for t in args.lengths.split(",")] if args.lengths else None
    jobs = SMOKE if args.smoke else plan(args.quick, args.skip_titans, args.mac, lengths)
    for kind, *rest in jobs:
        cap = 12 if rest[0] == "titans-pytorch-paper" else None
        row = measure(kind, *rest, cap_gb=cap, threads=1 if args.smoke else 2, malloc=malloc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
