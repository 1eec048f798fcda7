"""Small models on CPU: one training step of every variant at ~0.2M parameters, as JSON.

    python benchmarks/bench_small.py [--rounds 5] [--steps 3] [--out FILE]
    python benchmarks/bench_small.py --smoke          # tiny batch, one round, seconds

A step is batch 16 x T = 128 tokens, forward + backward + AdamW (issue 16's setup). Every model
runs in its own subprocess with 2 threads (``--threads``); the subprocesses alternate over
``--rounds`` rounds so that load from other processes hits every model alike, and the report
gives the median over rounds (each round's figure: the median of ``--steps`` timed steps after
a warm-up step). Measured per model: s/step, tokens/s, parameters, and ATen ops per step
(counted with a TorchDispatchMode over one whole step, optimizer included). Models:

  ours-mac            TitansLM MAC (dim 64, depth 2, heads 4, segment 32, chunk 8), default config
  ours-mac-compile    memory_backend=compile (not in --smoke: compiling takes ~1 min)
  ours-mag/-mal/-lmm/-transformer   the other variants at the same size
  titans-pytorch      MemoryAsContextTransformer 0.5.5 at the issue's settings, when installed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(vocab_size=128, dim=64, depth=2)
OURS = dict(heads=4, window=32, segment_len=32, chunk_size=8, num_persistent=4, memory_depth=2)
FULL = dict(batch=16, seq=128)
SMOKE = dict(batch=2, seq=32)


def build_ours(impl: str):
    from titans_train.models import ModelConfig, RuntimeConfig, TitansLM

    variant = impl.split("-")[1]
    backend = "compile" if impl.endswith("-compile") else "auto"  # auto: eager on CPU
    model = TitansLM(
        ModelConfig(variant=variant, **SIZE, **OURS), RuntimeConfig(memory_backend=backend)
    )

    def loss(tokens):
        return model(tokens[:, :-1], targets=tokens[:, 1:]).loss

    return model, loss


def build_titans_pytorch():
    import torch.nn as nn
    from titans_pytorch import MemoryAsContextTransformer

    model = MemoryAsContextTransformer(
        num_tokens=SIZE["vocab_size"],
        dim=SIZE["dim"],
        depth=SIZE["depth"],
        segment_len=32,
        heads=2,
        dim_head=32,
        num_persist_mem_tokens=4,
        num_longterm_mem_tokens=4,
        neural_memory_layers=(1, 2),
        num_residual_streams=1,
    )
    # With heads > 1 its per-head memory parameters are stride-0 views, which AdamW's in-place
    # step rejects (machine_notes 9): give each its own storage.
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if 0 in p.stride() and p.numel() > 1:
                setattr(mod, name, nn.Parameter(p.detach().clone()))

    def loss(tokens):
        return model(tokens, return_loss=True)

    return model, loss


def count_ops(step) -> int:
    """ATen ops dispatched by one call of ``step`` (forward, backward and optimizer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.n


def child(impl: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    """Runs inside the subprocess: build, warm up, count ops, time ``steps`` steps."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss = build_titans_pytorch() if impl == "titans-pytorch" else build_ours(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, SIZE["vocab_size"], (batch, seq + 1))

    def step():
        opt.zero_grad(set_to_none=True)
        loss(tokens).backward()
        opt.step()

    t0 = time.perf_counter()
    step()  # warm-up (and compilation, for -compile)
    first = time.perf_counter() - t0
    ops = count_ops(step)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(
        seconds=statistics.median(times),
        first_step_s=first,
        ops_per_step=ops,
        params=sum(p.numel() for p in model.parameters()),
        tokens=batch * seq,
    )


def measure(impl: str, batch: int, seq: int, steps: int, threads: int, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--child", impl, *map(str, (batch, seq, steps, threads))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, error=f"timeout after {timeout}s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(impl=impl, **json.loads(line[7:]))
    err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    return dict(impl=impl, error=err[0][:300])


def summarise(rows: list[dict], impls: list[str]) -> dict:
    """Median over rounds per model, and every model's speed relative to titans-pytorch."""
    out = {}
    for impl in impls:
        ok = [r for r in rows if r["impl"] == impl and "error" not in r]
        if not ok:
            errs = [r["error"] for r in rows if r["impl"] == impl]
            out[impl] = dict(error=errs[0] if errs else "not run")
            continue
        s = statistics.median(r["seconds"] for r in ok)
        out[impl] = dict(
            s_per_step=s,
            tokens_per_s=ok[0]["tokens"] / s,
            ops_per_step=ok[0]["ops_per_step"],
            params=ok[0]["params"],
            rounds=len(ok),
            per_round_s=[round(r["seconds"], 4) for r in ok],
        )
    ref = out.get("titans-pytorch", {}).get("s_per_step")
    for res in out.values():
        if ref and "s_per_step" in res:
            res["speed_vs_titans_pytorch"] = ref / res["s_per_step"]
    return out


def have_titans_pytorch() -> bool:
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny batch, one round, our models only")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round (median)")
    ap.add_argument("--models", help="comma-separated subset of the models")
    ap.add_argument("--skip-titans", action="store_true", help="leave out titans-pytorch")
    ap.add_argument("--threads", type=int, default=2, help="threads per subprocess (--smoke: 1)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, *nums = args.child
        print("RESULT " + json.dumps(child(impl, *map(int, nums))), flush=True)
        return 0

    shape = SMOKE if args.smoke else FULL
    rounds, steps = (1, 1) if args.smoke else (args.rounds, args.steps)
    threads = 1 if args.smoke else args.threads
    impls = ["ours-mac", "ours-mag", "ours-mal", "ours-lmm", "ours-transformer"]
    if not args.smoke:
        impls.insert(1, "ours-mac-compile")
        if have_titans_pytorch() and not args.skip_titans:
            impls.insert(0, "titans-pytorch")
    if args.models:
        impls = [m for m in args.models.split(",") if m]
    rows = []
    for r in range(rounds):
        for impl in impls:
            row = dict(
                round=r, **measure(impl, shape["batch"], shape["seq"], steps, threads, args.timeout)
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report = dict(
        setup=dict(**shape, rounds=rounds, steps=steps, threads=threads, **SIZE, ours=OURS),
        machine=dict(
            cpu=platform.processor() or platform.machine(),
            python=platform.python_version(),
            load_avg=os.getloadavg(),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        ),
        results=summarise(rows, impls),
        rows=rows,
    )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
