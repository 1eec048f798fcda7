"""Trainer benchmarks: loop overhead, ZeRO memory per rank, checkpoint speed, as JSON lines.

    python benchmarks/bench_trainer.py [--quick] [--out FILE] [--data DEMO_DIR]
    python benchmarks/bench_trainer.py --smoke --out FILE   # every kind once, one job (CI)

Every measurement is one `torchrun --nproc_per_node=2` job on CPU (gloo, DS_ACCELERATOR=cpu,
1 thread per rank); rank 0 prints the result. docs/benchmarks.md "Trainer" says what each sums.
  overhead    the real training loop (titans_train.trainer.Trainer.fit) vs a bare loop on a second
              engine from build_engine with in-memory batches, one bare step before each loop
              step in the same processes; tiny MAC, ZeRO-2, T=256, global batch 8, micro 2. A
              loop step is the wall time between its own next_step() calls, so everything the
              loop does counts. Control: bare vs bare. Rounds rotate the order of the variants.
  memory      tensors DeepSpeed holds per rank (params, grads, fp32 master, optimizer state,
              reduce buffers; zero_held.py) at ZeRO 0-3, tiny MAC at dim 256, depth 4
  checkpoint  checkpoint.save / engine.load_checkpoint vs a raw write (with and without fsync)
              and read of the same bytes in the same files, ZeRO 2 and 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "configs" / "experiments" / "tiny_mac.yaml"
WIDE = ["model.dim=256", "model.depth=4"]  # big enough that ZeRO partitions dominate
SEQ_LEN = 256
# --smoke: the same code at the smallest shape (run_child swaps it in for the job)
SMOKE_SEQ_LEN = 64
SMOKE_SHAPE = [f"train.seq_len={SMOKE_SEQ_LEN}", "train.global_batch=4", "model.segment_len=32"]
SMOKE_SHAPE += ["model.dim=32", "model.depth=2"]
SHAPE: list[str] = []


# -- shared (inside the torchrun job) ------------------------------------------------------------
def make_config(data: str, run_dir: str, *overrides: str):
    from titans_train.config_load import load_config

    base = [f"data.train=[{data}]", f"run_dir={run_dir}", "train.eval_interval=0"]
    base += ["checkpoint.resume=never", "tracking.mode=offline"]
    return load_config(EXPERIMENT, base + list(overrides) + SHAPE)


def new_engine(cfg, world_size: int):
    import torch

    from titans_train.models import TitansLM, apply_activation_checkpointing

    torch.manual_seed(cfg.train.seed)  # as Trainer.setup() builds it
    model = TitansLM(cfg.model, runtime=cfg.runtime)
    if cfg.runtime.activation_checkpointing:
        apply_activation_checkpointing(model)
    engine, _, _ = cfg.zero.build_engine(model, cfg.optim, cfg.train, world_size)
    return engine, model


def synthetic(cfg, world_size: int) -> list:
    """This rank's micro-batches of one step, already in memory (byte-tokenizer ids)."""
    import torch

    n = cfg.train.global_batch // (world_size * cfg.train.micro_batch)
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 257, (cfg.train.micro_batch, cfg.train.seq_len + 1), generator=g)
        for _ in range(n)
    ]


def bare_step(engine, micro_batches: list) -> None:
    for mb in micro_batches:
        loss = engine(mb[:, :-1], targets=mb[:, 1:]).loss
        engine.backward(loss)
        engine.step()


def emit(denv, row: dict) -> None:
    if denv.is_main:
        print("RESULT " + json.dumps(row), flush=True)


# -- 1. trainer overhead -------------------------------------------------------------------------
def wandb_cpu_seconds() -> float:
    """CPU time so far of this process's W&B service (wandb-core): it works beside the loop."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            if "wandb" in " ".join(p.cmdline()):
                total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def run_training(cfg, denv, around_next_step: Callable[[Callable[[], list]], list]) -> dict:
    """The one place that runs the real trainer, with its standard callbacks.
    ``around_next_step(next_step)`` replaces the loader's ``next_step()`` at the start of every
    loop iteration and must call it, so a step is the wall time between two calls."""
    from titans_train.callbacks import Callback, default_callbacks
    from titans_train.trainer import Trainer

    class AroundNextStep(Callback):
        def setup(self, trainer) -> None:
            fetch = trainer.loader.next_step
            trainer.loader.next_step = lambda: around_next_step(fetch)

    preemption = cfg.launch.build_preemption(denv.rank)
    callbacks = [AroundNextStep(), *default_callbacks(cfg, denv, preemption)]
    return Trainer(cfg, denv, callbacks).fit()


def child_overhead(denv, data: str, work: str, warmup: int, steps: int, rounds: int) -> None:
    """Paired steps: before each trainer step, one bare step on a second engine, so both see the
    same load on the shared machine (timing separate blocks drifted by +-30% between blocks)."""
    import torch.distributed as dist

    pair: dict = {}

    def paired(next_step):  # called once at the start of every loop iteration
        k, t0 = len(pair["spans"]), time.perf_counter()
        if k in (warmup, warmup + steps):
            pair["wandb_cpu"].append(wandb_cpu_seconds())
        bare_step(pair["engine"], pair["batches"])
        t1 = time.perf_counter()
        pair["spans"].append((t0, t1))
        batch = next_step()
        pair["data"].append(time.perf_counter() - t1)  # the trainer's own data wait
        return batch

    # +1: step W+N ends the window; the final checkpoint (at step == max_steps) comes after it.
    total = warmup + steps + 1
    variants = ["trainer", "trainer_no_wandb", "bare_vs_bare"]
    for r in range(rounds):
        for v in variants[r % 3 :] + variants[: r % 3]:  # rotate the order between rounds
            run_dir = f"{work}/{v}-{r}"
            wandb = "tracking.mode=disabled" if v == "trainer_no_wandb" else "tracking.mode=offline"
            cfg = make_config(data, run_dir, f"train.max_steps={total}", wandb)
            engine, _ = new_engine(cfg, denv.world_size)
            batches = synthetic(cfg, denv.world_size)
            row = dict(bench="overhead", variant=v, round=r, steps=steps, warmup=warmup)
            if (
                v == "bare_vs_bare"
            ):  # the control: a second identical bare loop in the trainer's slot
                other, _ = new_engine(cfg, denv.world_size)
                bare, ours = [], []
                for i in range(warmup + steps):
                    t0 = time.perf_counter()
                    bare_step(engine, batches)
                    t1 = time.perf_counter()
                    bare_step(other, batches)
                    if i >= warmup:
                        bare.append(t1 - t0)
                        ours.append(time.perf_counter() - t1)
                del other
            else:
                pair.update(engine=engine, batches=batches, spans=[], data=[], wandb_cpu=[])
                run_training(cfg, denv, paired)
                sp = pair["spans"]  # trainer step k: from the end of bare step k to the next one
                ours = [sp[k + 1][0] - sp[k][1] for k in range(warmup, warmup + steps)]
                bare = [end - start for start, end in sp[warmup : warmup + steps]]
                cpu, window = pair["wandb_cpu"], range(warmup, warmup + steps)
                row["wandb_cpu_s_per_step"] = (cpu[1] - cpu[0]) / steps  # 0 when disabled
                row["data_ms"] = 1e3 * statistics.mean(pair["data"][k] for k in window)
            del engine
            dist.barrier()
            row.update(seconds=sum(ours), bare_seconds=sum(bare), ratio=sum(ours) / sum(bare))
            row.update(steps_per_s=steps / sum(ours), bare_steps_per_s=steps / sum(bare))
            row.update(median_ms=1e3 * statistics.median(ours))
            row.update(bare_median_ms=1e3 * statistics.median(bare))
            emit(denv, row)
            gc.collect()


# -- 2. ZeRO memory ------------------------------------------------------------------------------
def child_memory(denv, data: str, work: str, stage: int, threshold: str) -> None:
    import resource

    import torch.distributed as dist
    from zero_held import held_bytes  # benchmarks/ is on sys.path: this script's folder

    extra = [] if threshold == "default" else [f"zero.param_persistence_threshold={threshold}"]
    cfg = make_config(data, work, f"zero.stage={stage}", *WIDE, *extra)
    engine, model = new_engine(cfg, denv.world_size)
    batches = synthetic(cfg, denv.world_size)
    bare_step(engine, batches)  # step 1 creates the optimizer state
    snaps: dict = {}

    def snapshot(grad) -> None:
        snaps.setdefault("in_backward", held_bytes(*both))

    def in_backward(module, inputs, output) -> None:  # the embedding's output gradient comes
        # last: every other gradient has reached DeepSpeed's buffers, not yet reduced
        if mb is batches[-1]:
            output.register_hook(snapshot)

    both = (engine, model)
    model.embed.register_forward_hook(in_backward)
    for mb in batches:  # step 2
        engine.backward(engine(mb[:, :-1], targets=mb[:, 1:]).loss)
        if mb is not batches[-1]:
            engine.step()
    snaps["before_step"] = held_bytes(*both)  # after the last backward: all state is held
    engine.step()
    gc.collect()
    snaps["after_step"] = held_bytes(*both)
    for key in ("in_backward", "after_step"):
        snaps[key].pop("where")  # one list of sources per rank is enough
    snaps["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = [None] * denv.world_size
    dist.all_gather_object(ranks, snaps)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    emit(denv, dict(bench="memory", stage=stage, threshold=threshold, params=n_params, ranks=ranks))


# -- 3. checkpoint speed -------------------------------------------------------------------------
def rank_of(name: str) -> int:
    """Which rank wrote a checkpoint file: DeepSpeed names partitions zero_pp_rank_<r>_...;
    the model states and our trainer_state.json / COMPLETE come from rank 0."""
    m = re.search(r"zero_pp_rank_(\d+)", name)
    return int(m.group(1)) if m else 0


def child_checkpoint(denv, data: str, work: str, stage: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from titans_train import checkpoint as ckpt
    from titans_train.fsutil import fsync_path

    cfg = make_config(data, work, f"zero.stage={stage}", *WIDE)
    engine, _ = new_engine(cfg, denv.world_size)
    bare_step(engine, synthetic(cfg, denv.world_size))
    root = Path(work) / f"ckpt-z{stage}"
    raw = Path(work) / f"raw-z{stage}-rank{denv.rank}"
    nosum = Path(work) / f"ckpt-z{stage}-nosum"

    def timed(fn) -> float:  # collective: from all ranks ready to all ranks done
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def raw_write(payload, sizes: list[int], fsync: bool) -> None:
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True)
        for i, n in enumerate(sizes):
            with open(raw / f"f{i}", "wb") as f:
                f.write(payload[:n])
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        if fsync:
            fsync_path(str(raw))

    def raw_read() -> None:
        for f in sorted(raw.iterdir()):
            f.read_bytes()

    state = {"step": 1, "tokens": 0, "data": {}, "wandb_run_id": None, "config": {}}
    for r in range(rounds):
        dist.barrier()
        if denv.is_main:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(nosum, ignore_errors=True)
        path = ckpt.step_dir(root, r + 1)
        t_save = timed(partial(ckpt.save, engine, root, r + 1, state))  # checksum=auto: xxh3
        t_nosum = timed(partial(ckpt.save, engine, nosum, r + 1, state, checksum="none"))
        t_load = timed(partial(engine.load_checkpoint, str(root), tag=path.name))
        # DeepSpeed's own save alone (no fsync, no trainer state, no marker): our protocol's cost
        t_ds = timed(partial(engine.save_checkpoint, str(root), tag="ds", save_latest=False))
        files = [f for f in sorted(path.rglob("*")) if f.is_file()]
        mine = [f.stat().st_size for f in files if rank_of(f.name) == denv.rank]
        total = sum(f.stat().st_size for f in files)
        payload = torch.randint(0, 256, (max(mine, default=1),), dtype=torch.uint8).numpy().data
        t_fsync = timed(partial(raw_write, payload, mine, fsync=True))
        t_read = timed(raw_read)
        t_nofsync = timed(partial(raw_write, payload, mine, fsync=False))
        row = dict(bench="checkpoint", stage=stage, round=r, bytes=total, files=len(files))
        row.update(save_s=t_save, load_s=t_load, deepspeed_save_s=t_ds)
        row.update(raw_write_fsync_s=t_fsync, raw_write_s=t_nofsync, raw_read_s=t_read)
        row.update(save_no_checksum_s=t_nosum)
        for algorithm in ("blake2b", "xxh3"):  # rank 0 hashes every file at commit (warm cache)
            t0 = time.perf_counter()
            for f in files:
                ckpt.file_digest(f, algorithm)
            row[f"{algorithm}_s"] = time.perf_counter() - t0
        emit(denv, row)
    shutil.rmtree(raw, ignore_errors=True)


# -- orchestration -------------------------------------------------------------------------------
def torchrun(kind: str, *args, timeout: int = 1800) -> list[dict]:
    """One 2-process job; returns its RESULT rows (or one error row)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as work:
        names = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
        env.update({n: f"{work}/{n.lower()}" for n in names})  # W&B files stay in the job dir
        env.update(WANDB_SILENT="true", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += [__file__, "--child", kind, *map(str, args), work]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return [dict(bench=kind, args=list(map(str, args)), error=f"timeout {timeout}s")]
    rows = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not rows:
        lines = proc.stderr.strip().splitlines()
        # the child's exception line first (torchrun's own ChildFailedError comes after it)
        raised = [x for x in lines if re.search(r"^(\[rank\d+\]:\s*)?[\w.]+(Error|Exception): ", x)]
        tail = raised[:1] or [x for x in lines if re.search(r"Error|error:", x)][-2:]
        tail = tail or lines[-3:] or ["?"]
        rows.append(dict(bench=kind, args=list(map(str, args)), error=" | ".join(tail)[-500:]))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Medians over rounds and the ratios docs/benchmarks.md quotes."""
    med, out = statistics.median, []
    over = [r for r in rows if r["bench"] == "overhead" and "error" not in r]
    for v in ("trainer", "trainer_no_wandb", "bare_vs_bare"):
        ratios = [r["ratio"] for r in over if r["variant"] == v]
        if ratios:  # per round: the loop's time over its paired bare steps' time
            row = dict(bench="summary", what=f"overhead {v}", overhead=med(ratios) - 1)
            row.update(min=min(ratios) - 1, max=max(ratios) - 1, rounds=len(ratios))
            out.append(row)
    base = None
    for r in (r for r in rows if r["bench"] == "memory" and "error" not in r):
        row = dict(bench="summary", what=f"memory stage {r['stage']} ({r['threshold']})")
        for snap in ("before_step", "in_backward"):  # max over ranks, without the reduce bucket
            sums = [x[snap]["bytes"] for x in r["ranks"]]
            held = max(sum(v for k, v in b.items() if k != "reduce_buffers") for b in sums)
            base = base or held  # stage 0 comes first
            row.update({f"{snap}_mb": held / 1e6, f"{snap}_ratio": held / base})
            row[f"{snap}_reduce_bucket_mb"] = max(b.get("reduce_buffers", 0) for b in sums) / 1e6
        out.append(row)
    for stage in (2, 3):
        ck = [r for r in rows if r["bench"] == "checkpoint" and r.get("stage") == stage]
        if not ck:
            continue
        mb = ck[0]["bytes"] / 1e6
        keys = (
            "save_s",
            "save_no_checksum_s",
            "blake2b_s",
            "xxh3_s",
            "deepspeed_save_s",
            "raw_write_fsync_s",
            "raw_write_s",
            "load_s",
            "raw_read_s",
        )
        t = {k: med([r[k] for r in ck if k in r]) for k in keys}
        row = dict(bench="summary", what=f"checkpoint stage {stage}", mb=mb, rounds=len(ck))
        row.update({k[:-2] + "_mb_s": mb / t[k] for k in keys})
        row.update(save_vs_raw_fsync=t["raw_write_fsync_s"] / t["save_s"])
        row.update(save_vs_raw=t["raw_write_s"] / t["save_s"])
        row.update(load_vs_raw_read=t["raw_read_s"] / t["load_s"])
        row.update(blake2b_share_of_save=t["blake2b_s"] / t["save_s"])
        row.update(xxh3_share_of_save=t["xxh3_s"] / t["save_s"])
        out.append(row)
    return out


def demo_data(out: Path, seq_len: int = SEQ_LEN, max_mb: float = 2.0) -> Path:
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "data_pipelines.demo", "--out", str(out)]
        cmd += ["--seq-len", str(seq_len), "--max-mb", str(max_mb), "--no-progress"]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    return out


CHILDREN = {"overhead": child_overhead, "memory": child_memory, "checkpoint": child_checkpoint}
# --smoke: every kind at its smallest, in one torchrun job (a job's start-up costs ~15 s here)
SMOKE = [("overhead", 1, 1, 1), ("memory", 0, "default"), ("memory", 3, "default")]
SMOKE += [("checkpoint", 2, 1), ("checkpoint", 3, 1)]


def run_child(argv: list[str]) -> None:
    """Inside the torchrun job: ``KIND DATA [PARAMS...] WORK`` (KIND ``smoke`` runs SMOKE)."""
    from titans_train.distributed import init_distributed

    kind, data, *params, work = argv
    denv = init_distributed()
    jobs = SMOKE if kind == "smoke" else [(kind, *params)]
    if kind == "smoke":  # the smallest shape, also over WIDE (make_config appends SHAPE last)
        SHAPE[:] = SMOKE_SHAPE
    for name, *args in jobs:
        args = [int(p) if isinstance(p, str) and p.isdigit() else p for p in args]
        t0 = time.perf_counter()
        CHILDREN[name](denv, data, work, *args)
        if denv.is_main:
            print(
                f"[bench_trainer] {name} {args}: {time.perf_counter() - t0:.1f} s", file=sys.stderr
            )


def plan(only: set[str], quick: bool, smoke: bool) -> list[tuple]:
    """The torchrun jobs: (kind, *params)."""
    if smoke:
        return [("smoke",)]
    jobs = []
    if "overhead" in only:  # warm-up, timed steps (a multiple of log_interval 10), rounds
        jobs.append(("overhead", 5, 10, 1) if quick else ("overhead", 10, 20, 8))
    if "memory" in only:
        stages = (0, 2, 3) if quick else (0, 1, 2, 3)  # stage 0 first: the base
        jobs += [("memory", s, "default") for s in stages]
        jobs += [] if quick else [("memory", 3, 0)]  # ZeRO-3, no persistent params
    if "checkpoint" in only:
        jobs += [("checkpoint", s, 2 if quick else 10) for s in (2, 3)]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps, rounds and stages")
    ap.add_argument("--smoke", action="store_true", help="every kind once, 1-2 steps (CI)")
    ap.add_argument("--out", type=Path, help="also write the JSON lines here")
    ap.add_argument(
        "--data",
        type=Path,
        help="demo shards (T=256, T=64 with --smoke); built in a temp dir if absent",
    )
    ap.add_argument("--only", nargs="+", choices=list(CHILDREN))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child)
        return

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        shape = dict(seq_len=SMOKE_SEQ_LEN, max_mb=0.25) if args.smoke else {}
        data = args.data or demo_data(Path(tmp) / "demo", **shape)
        rows = []
        for kind, *params in plan(set(args.only or CHILDREN), args.quick, args.smoke):
            for row in torchrun(kind, data, *params):
                rows.append(row)
                print(json.dumps(row), flush=True)
        summary = summarize(rows)
        for row in summary:
            print(json.dumps(row), flush=True)
    rows += summary
    missing = set(CHILDREN) - {r["bench"] for r in rows}
    if args.smoke and missing:  # a kind that printed nothing is a failure too
        rows.append(dict(bench="smoke", error=f"no result from {sorted(missing)}"))
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
