"""The GPU smoke check: the first thing to run on a new GPU machine (docs/gpu_smoke.md).

    python benchmarks/gpu_smoke.py [--out DIR] [--stages 0,1,...]   # one GPU, < 10 minutes
    python benchmarks/gpu_smoke.py --cpu-dry-run   # (or --smoke) every stage, tiny, on CPU

Stages: 0 environment, 1 flash-attn vs fp64, 2 attend() conformance, 3 memory, 4 whole model,
5 trainer (launch/torchrun.sh, resume, titans-eval), 6 throughput. Writes DIR/gpu_smoke.json
(default DIR: runs/gpu_smoke/<timestamp>) and prints a table; exits 1 if any stage failed.
A stage that raises is a failure with its traceback in the JSON; the other stages still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

EXPERIMENT = ROOT / "configs" / "experiments" / "tiny_mac.yaml"
DRY_RUN_ZERO = (2,)  # 2 cores: one ZeRO stage keeps the dry run near a minute
STAGE_NAMES = ("environment", "flash_vs_fp64", "attend", "memory", "model", "trainer", "throughput")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_smoke.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", "--smoke", action="store_true", dest="cpu_dry_run",
                    help="every stage, tiny, on CPU (--smoke: the same)")  # fmt: skip
    ap.add_argument("--stages", default=",".join(str(i) for i in range(len(STAGE_NAMES))),
                    help="comma-separated stage numbers (default: all)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="output dir (default runs/gpu_smoke/<timestamp>)")
    args = ap.parse_args(argv)
    try:
        args.stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--stages {args.stages!r}: expected numbers like 0,3,4")
    bad = [s for s in args.stages if not 0 <= s < len(STAGE_NAMES)]
    if not args.stages:
        ap.error("--stages: name at least one stage")
    if bad:
        ap.error(f"--stages: no stage {bad[0]}; stages are 0-{len(STAGE_NAMES) - 1}")
    if args.out is None:
        args.out = ROOT / "runs" / "gpu_smoke" / time.strftime("%Y%m%d-%H%M%S")
    return args


def set_environment(dry_run: bool) -> None:
    """Before torch and DeepSpeed are imported: one device for everything, also in the trainer
    processes (the dry run hides any GPU; a real run makes DeepSpeed use CUDA)."""
    if dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"  # the fused memory kernel on CPU (stages 3 and 6)
    os.environ["DS_ACCELERATOR"] = "cpu" if dry_run else "cuda"
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


# -- stage 0 -----------------------------------------------------------------------------------
def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def flash_info() -> dict:
    """flash-attn's version, whether the project's adapter imports it, and its signature style."""
    import inspect

    info = {"version": package_version("flash-attn"), "fa3_interface": None}
    try:
        from flash_attn.flash_attn_interface import _flash_attn_forward
    except Exception as e:  # the same import the adapter does (models/attention/flash.py)
        return {**info, "usable": False, "reason": f"{type(e).__name__}: {e}"}
    # flash-attn >= 2.7 registers it as a torch custom op; the signature is on _init_fn
    params = inspect.signature(getattr(_flash_attn_forward, "_init_fn", _flash_attn_forward))
    style = "window_size (2.6)"
    if "window_size_left" in params.parameters:
        style = "window_size_left/right (2.7+)"
    try:
        import flash_attn_interface  # noqa: F401  (FA3, Hopper); reported, not used

        info["fa3_interface"] = "importable (not used: the adapter calls FA2)"
    except Exception as e:
        info["fa3_interface"] = f"not importable ({type(e).__name__})"
    return {**info, "usable": True, "signature": style}


def environment_stage(smoke) -> dict:
    import torch

    from titans_train.models.attention import select_backend

    cuda = torch.cuda.is_available()
    d = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "deepspeed": package_version("deepspeed"),
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "flash_attn": flash_info(),
    }
    if cuda:
        d["device_name"] = torch.cuda.get_device_name(smoke.device)
        d["capability"] = list(torch.cuda.get_device_capability(smoke.device))
        d["bf16_supported"] = torch.cuda.is_bf16_supported()
    d["auto_backend"] = {
        str(dt).removeprefix("torch."): select_backend(
            torch.empty(1, 4, 8, 64, device=smoke.device, dtype=dt)
        )
        for dt in (torch.bfloat16, torch.float32)
    }
    failures = []
    if not smoke.dry_run:
        if not cuda:
            failures.append("no CUDA device (use --cpu-dry-run on a CPU machine)")
        elif d["capability"] >= [8, 0] and d["auto_backend"]["bfloat16"] != "flash":
            why = d["flash_attn"].get("reason", "flash-attn imports, but auto did not pick it")
            sm = "sm{}{}".format(*d["capability"])
            picked = d["auto_backend"]["bfloat16"]
            failures.append(f"{sm}: auto picks {picked} for bf16, not flash: {why}")
    name = d.get("device_name", "cpu")
    auto = d["auto_backend"]
    summary = f"{name}, torch {d['torch']}, flash-attn {d['flash_attn']['version']}, "
    summary += f"auto bf16->{auto['bfloat16']} fp32->{auto['float32']}"
    return {"ok": not failures, "failures": failures, "summary": summary, **d}


# -- stages 1 and 2: benchmarks/gpu_smoke_attention.py -----------------------------------------
def flash_stage(smoke) -> dict:
    from gpu_smoke_attention import flash_stage as run

    return attention_summary(run(smoke.device, smoke.dry_run))


def attend_stage(smoke) -> dict:
    from gpu_smoke_attention import attend_stage as run

    return attention_summary(run(smoke.device, smoke.dry_run))


def attention_summary(result: dict) -> dict:
    if "summary" not in result and isinstance(result.get("cases"), list):
        cases = result["cases"]
        bad = sum(1 for c in cases if isinstance(c, dict) and not c.get("ok", True))
        result["summary"] = f"{len(cases)} cases, {bad} failed"
    return result


# -- stage 5: trainer ---------------------------------------------------------------------------
def launch(smoke, data: Path, run_dir: Path, zero: int, steps: int, plan: dict) -> dict:
    """launch/torchrun.sh with one process on the tiny MAC; its log goes next to the run."""
    overrides = [
        f"data.train=[{data}]", f"run_dir={run_dir}", f"zero.stage={zero}",
        "train.seq_len=128", f"train.global_batch={plan['batch']}",
        f"train.micro_batch={plan['batch']}", f"train.max_steps={steps}", "train.eval_interval=0",
        "optim.warmup_steps=2", "tracking.log_interval=1", "tracking.mode=offline",
        f"checkpoint.interval={plan['interval']}", "checkpoint.keep_last=10",
        f"debug.nan_loss_at_steps=[{plan['nan']}]",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    wandb = run_dir / "wandb-home"
    env.update(
        {
            f"WANDB_{k.upper()}": str(wandb / k)
            for k in ("dir", "cache_dir", "config_dir", "data_dir")
        }
    )
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHON=sys.executable, NPROC_PER_NODE="1")
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", str(EXPERIMENT), *overrides]
    log = run_dir.parent / f"{run_dir.name}.steps{steps}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            timeout=900).returncode  # fmt: skip
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": str(log),
            "text": log.read_text(errors="replace")}  # fmt: skip


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    """metrics.jsonl: step -> row, and the {"header": ...} lines each (re)start writes."""
    path = run_dir / "metrics.jsonl"
    lines = (
        [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if path.exists()
        else []
    )
    return {r["step"]: r for r in lines if "loss" in r}, [
        r["header"] for r in lines if "header" in r
    ]


def check_run(run_dir: Path, first: int, last: int, nan: int | None) -> list[str]:
    """Problems in metrics.jsonl for steps first..last: a missing step, a non-finite loss other
    than the injected one, the injected one not skipped."""
    rows, problems = read_metrics(run_dir)[0], []
    for step in range(first, last + 1):
        if step not in rows:
            problems.append(f"step {step} not in metrics.jsonl")
        elif (step == nan) == math.isfinite(rows[step]["loss"]):
            problems.append(f"step {step}: loss {rows[step]['loss']}")
    if nan is not None and rows.get(last, {}).get("skipped_steps") != 1:
        problems.append(f"skipped_steps at step {last} is not 1: the NaN step was not skipped")
    return problems


def check_backend(smoke, run_dir: Path) -> tuple[list[dict], list[str]]:
    """The attention backend each (re)start reports in its metrics.jsonl header, against the one
    select_backend picks for the tiny model's heads in the training dtype."""
    import torch

    from titans_train.config_load import load_model_config
    from titans_train.models.attention import select_backend

    cfg = load_model_config(ROOT / "configs" / "model" / "tiny.yaml")
    dtype = torch.float32 if smoke.dry_run else torch.bfloat16
    want = select_backend(
        torch.empty(1, cfg.heads, 1, cfg.head_dim, device=smoke.device, dtype=dtype)
    )
    headers = read_metrics(run_dir)[1]
    got = [h["attention"].get("backend") for h in headers if isinstance(h.get("attention"), dict)]
    return headers, [f"trainer attention backend {b}, expected {want}" for b in got if b != want]


def train_resume_eval(smoke, data: Path, zero: int, plan: dict) -> dict:
    run_dir = smoke.out / f"trainer_zero{zero}"
    steps, more = plan["steps"], plan["steps"] + plan["interval"]
    row, problems = {}, []
    for name, (max_steps, first, nan) in {"train": (steps, 1, plan["nan"]),
                                          "resume": (more, steps + 1, None)}.items():  # fmt: skip
        res = launch(smoke, data, run_dir, zero, max_steps, plan)
        row[name] = {k: res[k] for k in ("rc", "seconds", "log")}
        backend = [ln for ln in res["text"].splitlines() if "attention backend" in ln.lower()]
        row[name]["attention_log"] = backend[:1]
        if res["rc"] != 0:
            tail = res["text"].strip().splitlines()[-1:] or [""]
            problems.append(f"{name}: exit {res['rc']} ({tail[0][:200]}); see {res['log']}")
            break
        problems += [f"{name}: {p}" for p in check_run(run_dir, first, max_steps, nan)]
        if name == "resume" and f"resumed from {run_dir}" not in res["text"]:
            problems.append(f"resume: no 'resumed from ... at step {steps}' in {res['log']}")
    row["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    row["headers"], backend_problems = check_backend(smoke, run_dir)
    problems += backend_problems
    if not problems:
        row["eval"], eval_problems = evaluate(run_dir)
        problems += eval_problems
    row["problems"] = problems
    return row


def evaluate(run_dir: Path) -> tuple[dict, list[str]]:
    """titans-eval --suites ppl on the run's newest checkpoint (its default device and dtype)."""
    out = run_dir / "eval.json"
    cmd = [sys.executable, "-m", "titans_train.evaluate", "--checkpoint", str(run_dir)]
    cmd += ["--suites", "ppl", "--lengths", "128", "--ppl-tokens", "512", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        return {"rc": proc.returncode}, [
            f"titans-eval exit {proc.returncode}: {proc.stderr[-300:]}"
        ]
    ppl = json.loads(out.read_text())["results"]["ppl"]["128"]["ppl"]
    return {"ppl@128": ppl}, [] if math.isfinite(ppl) else [f"titans-eval: ppl {ppl}"]


def trainer_stage(smoke) -> dict:
    """12 steps (checkpoint every 6, a NaN loss at step 4), a rerun that resumes for 6 more, and
    titans-eval, at ZeRO 0, 2 and 3, the three side by side on the one GPU (a tiny model; the
    wall time is mostly start-up). Dry run: ZeRO 2 only, 4 steps (checkpoint every 2, NaN at 3)
    and 2 more."""
    plan = dict(steps=4, interval=2, nan=3, batch=2, zero=DRY_RUN_ZERO)
    if not smoke.dry_run:
        plan = dict(steps=12, interval=6, nan=4, batch=8, zero=(0, 2, 3))
    data = smoke.out / "shards"
    if not (data / "manifest.json").exists():
        cmd = [sys.executable, "-m", "data_pipelines.demo", "--out", str(data), "--seq-len", "128",
               "--max-mb", "2", "--no-progress"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    zeros = plan.pop("zero")
    with ThreadPoolExecutor(len(zeros)) as pool:  # each thread waits on its own subprocesses
        rows = pool.map(lambda z: train_resume_eval(smoke, data, z, plan), zeros)
        runs = {f"zero{z}": row for z, row in zip(zeros, rows)}
    failures = [f"{name}: {p}" for name, r in runs.items() for p in r["problems"]]
    ppl = {name: r.get("eval", {}).get("ppl@128") for name, r in runs.items()}
    summary = ", ".join(f"{k} ppl {v:.1f}" if v else f"{k} failed" for k, v in ppl.items())
    return {"ok": not failures, "failures": failures, "summary": summary, "plan": plan, **runs}


# -- the runner --------------------------------------------------------------------------------
def stage_functions() -> list:
    from gpu_smoke_stages import memory_stage, model_stage, throughput_stage

    return [environment_stage, flash_stage, attend_stage, memory_stage, model_stage,
            trainer_stage, throughput_stage]  # fmt: skip


def run_stage(fn, smoke) -> dict:
    import torch

    torch.manual_seed(0)
    torch._dynamo.reset()  # each stage gets dynamo's whole recompile budget
    if smoke.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(smoke.device)
    t0 = time.perf_counter()
    try:
        details, error = fn(smoke), None
        if not isinstance(details, dict) or "ok" not in details:
            details, error = {"ok": False, "returned": repr(details)}, "stage returned no 'ok'"
    except Exception:
        details, error = {"ok": False}, traceback.format_exc()
    ok = bool(details.pop("ok")) and error is None
    if not ok and error is None:
        error = "; ".join(details.get("failures") or []) or "stage reported ok=False"
    return {"ok": ok, "seconds": round(time.perf_counter() - t0, 2), "details": details,
            "error": error}  # fmt: skip


def print_summary(report: dict) -> None:
    print(f"\nGPU smoke check ({'CPU dry run' if report['dry_run'] else report['device']})")
    print(f"{'#':<2} {'stage':<14} {'result':<6} {'seconds':>8}  key numbers")
    for i, (name, r) in enumerate(report["stages"].items()):
        result = "PASS" if r["ok"] else "FAIL"
        key = r["details"].get("summary", "")
        print(f"{report['numbers'][i]:<2} {name:<14} {result:<6} {r['seconds']:>8.1f}  {key}")
        if not r["ok"]:
            print("   " + (r["error"] or "").strip().splitlines()[-1][:300])
    verdict = "all stages passed" if report["ok"] else "FAILED (details in the JSON)"
    print(f"\n{verdict}; {report['json']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_environment(args.cpu_dry_run)
    import torch
    from gpu_smoke_stages import Smoke

    device = torch.device("cpu" if args.cpu_dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(device, args.cpu_dry_run, args.out.resolve())
    functions = stage_functions()
    if not args.cpu_dry_run and device.type != "cuda":
        args.stages = [0]  # nothing else means anything without a GPU; stage 0 says why
    path = args.out / "gpu_smoke.json"
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
              "dry_run": args.cpu_dry_run, "device": str(device), "json": str(path),
              "numbers": args.stages, "stages": {}}  # fmt: skip
    for i in args.stages:
        print(f"[gpu_smoke] stage {i} {STAGE_NAMES[i]} ...", file=sys.stderr, flush=True)
        report["stages"][STAGE_NAMES[i]] = run_stage(functions[i], smoke)
        report["ok"] = all(r["ok"] for r in report["stages"].values())
        path.write_text(json.dumps(report, indent=1, default=str))  # after every stage
    print_summary(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
