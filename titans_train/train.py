"""The training loop. ``titans-train --config configs/experiments/X.yaml key=value ...``

One step, top to bottom: the loader hands this rank its micro-batches of the global batch; the
model inside the DeepSpeed engine returns the loss; the engine runs backward and, at the last
micro-batch, the optimizer step (or skips it when the gradients are not finite); metrics go to
the tracker; every ``checkpoint.interval`` steps a checkpoint commits. Before each step the ranks
agree whether a preemption signal or the wall-time guard asks them to stop (preemption.py); if
so they commit a checkpoint and exit for a requeue.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from titans_train import checkpoint as ckpt
from titans_train import train_state
from titans_train.config import (
    Config,
    ConfigError,
    load_config,
    public_dict,
    public_yaml,
    validate,
)
from titans_train.data import DataError, StreamingLoader, check_sources, validation_loader
from titans_train.distributed import (
    DistEnv,
    device,
    env_from_launcher,
    failure_message,
    init_distributed,
    mark_progress,
    set_tf32,
    set_timeout,
    timeout_for,
)
from titans_train.engine import build_engine
from titans_train.fsutil import write_text_atomically
from titans_train.metrics import StepMeter, peak_flops_per_device
from titans_train.models import TitansLM, apply_activation_checkpointing
from titans_train.models.attention import attention_backend_report
from titans_train.preemption import (
    REQUEUE_EXIT,
    Preemption,
    exit_for_requeue,
    thin_margin_warning,
)
from titans_train.run_lock import RunLockError, take_run_lock
from titans_train.tracking import Tracker, format_metrics


def write_metrics(path, step: int, metrics: dict) -> None:
    """Append one JSON line per logged step to <run>/metrics.jsonl (rank 0): W&B-independent."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def write_metrics_header(path, header: dict) -> None:
    """Open each (re)start's part of metrics.jsonl with {"header": ...} (a line with no "step")."""
    with open(path, "a") as f:
        f.write(json.dumps({"header": header}) + "\n")


def rewind_metrics(path: Path, step: int) -> int:
    """Resume: drop the rows logged after ``step`` (they are trained again), atomically.
    Rows without a step (headers) stay; a torn last line goes. Returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        write_text_atomically(str(path), "".join(kept))
    return dropped


def log0(denv: DistEnv, msg: str) -> None:
    if denv.is_main:
        tqdm.write(msg, file=sys.stderr)


def all_mean(values: list[torch.Tensor]) -> float:
    """Mean over micro-batches and ranks (equal micro-batch sizes everywhere). Reduced as a CPU
    tensor: the group serves CPU tensors over gloo on a GPU too (distributed.py)."""
    x = torch.stack([v.detach().float().cpu() for v in values]).mean()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


def loaders(cfg: Config, denv: DistEnv) -> tuple[StreamingLoader, dict]:
    common = dict(
        seq_len=cfg.train.seq_len,
        vocab_size=cfg.model.vocab_size,
        global_batch=cfg.train.global_batch,
        micro_batch=cfg.train.micro_batch,
        rank=denv.rank,
        world_size=denv.world_size,
        seed=cfg.data.seed,
        num_workers=cfg.data.num_workers,
        interleave=cfg.data.interleave,
        verify=cfg.data.verify,
        return_doc_starts=False,
    )
    train = StreamingLoader(cfg.data.train, weights=cfg.data.weights, **common)
    return train, common


@torch.no_grad()
def evaluate(engine, cfg: Config, common: dict) -> dict[str, float]:
    """Validation loss and perplexity over ``eval_batches`` global batches of the val split."""
    engine.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0  # CPU: reduced over gloo on a GPU
    with validation_loader(cfg.data.val or cfg.data.train, **common) as val:
        for i, micro_batches in enumerate(val):
            if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                break
            for mb in micro_batches:
                tokens = mb.tokens.to(device())
                out = engine(tokens[:, :-1], targets=tokens[:, 1:])
                n = tokens[:, 1:].numel()
                total += torch.tensor([out.loss.item() * n, n], dtype=torch.float64)
            count += 1
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    if count == 0 or total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


def record_samples(run_dir, rank: int, step: int, micro_batches) -> None:
    """debug.record_samples: the (source, shard, row) ids this rank trained on at ``step``."""
    ids = torch.cat([mb.sample_ids for mb in micro_batches]).tolist()
    with open(run_dir / f"samples.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "samples": ids}) + "\n")


def train(cfg: Config, denv: DistEnv, preemption: Preemption) -> dict:
    """Train to ``max_steps``; returns the last metrics, plus ``stopped`` (the reason) when a
    signal or the wall-time guard ended the run early after a committed checkpoint."""
    torch.manual_seed(cfg.train.seed)
    set_tf32(cfg.train.tf32)
    run_dir = cfg.run_path
    if denv.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        resolved = public_yaml(cfg)
        (run_dir / "config.yaml").write_text(resolved)
        log0(denv, f"resolved config:\n{resolved}")
    point = train_state.find_resume_point(cfg, denv)
    for message in point.messages:
        log0(denv, message)
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    max_steps = cfg.train.max_steps
    if cfg.train.max_tokens:
        max_steps = min(max_steps, math.ceil(cfg.train.max_tokens / tokens_per_step))
    if point.path and point.step >= max_steps:  # before the engine: nothing left to pay for
        log0(
            denv,
            f"{point.path} is at step {point.step}: the run already reached its {max_steps} "
            f"steps, nothing to train. To continue it, raise train.max_steps (e.g. "
            f'train.max_steps={2 * max_steps}; with make: TRAIN_ARGS="train.max_steps='
            f'{2 * max_steps}"), or start a new run with name=<new-name>.',
        )
        return {"step": point.step, "tokens": point.state["tokens"]}
    train_state.prepare(point, denv)  # the universal conversion, when the world size changed
    if denv.is_main and (dropped := rewind_metrics(run_dir / "metrics.jsonl", point.step)):
        log0(denv, f"metrics.jsonl: dropped {dropped} rows after step {point.step} (rewound)")

    model = TitansLM(cfg.model, runtime=cfg.runtime)
    if cfg.runtime.activation_checkpointing:
        apply_activation_checkpointing(model)
    engine, _, scheduler = build_engine(cfg, model, denv.world_size, point.universal)
    loader, common = loaders(cfg, denv)
    step, tokens, run_id = 0, 0, None
    if point.path:
        train_state.restore(point, engine, loader, denv)
        step, tokens, run_id = point.step, point.state["tokens"], point.state["wandb_run_id"]
        if point.state["world_size"] != denv.world_size:
            log0(denv, "world size changed: RNG states not restored (the data order is unaffected)")
        log0(denv, f"resumed from {point.path} at step {step}")
    param = next(engine.module.parameters())  # the activations' device and dtype
    attn = attention_backend_report(
        param.device, param.dtype, cfg.runtime.attn_backend, cfg.model.head_dim
    )
    log0(denv, f"attention backend: {attn['backend']} ({json.dumps(attn)})")
    if denv.is_main:
        write_metrics_header(run_dir / "metrics.jsonl", {"start_step": step, "attention": attn})
    tracker = Tracker(
        cfg.tracking,
        run_dir=run_dir,
        run_name=cfg.name,
        config={**public_dict(cfg), "attention_backend": attn},
        rank=denv.rank,
        run_id=run_id,
        resume_step=step if point.path else None,
    )
    peak, peak_source = peak_flops_per_device(cfg.train.peak_tflops)
    meter = StepMeter(cfg.model, cfg.train.seq_len, denv.world_size, peak)
    log0(denv, f"{model.num_params() / 1e6:.2f}M parameters; MFU against {peak_source}")
    # A progress bar on a terminal; in a log file (SLURM) one plain line per logged step.
    interactive = denv.is_main and sys.stderr.isatty()
    bar = tqdm(
        total=max_steps, initial=step, disable=not interactive, unit="step", dynamic_ncols=True
    )
    # Collective timeout now in force; checkpoint saves always get the long start-up one.
    timeout = cfg.launch.startup_timeout

    def checkpoint() -> Path:
        t0 = time.perf_counter()
        with timeout_for(cfg.launch.startup_timeout, restore=timeout):
            path = train_state.save(cfg, engine, loader, denv, step, tokens, tracker.run_id)
        log0(denv, f"step {step}: checkpoint {path}")
        if preemption.seconds_left() is not None:  # under a SLURM time limit
            warning = thin_margin_warning(time.perf_counter() - t0, cfg.launch.walltime_margin)
            if warning:
                log0(denv, warning)
        return path

    skipped_in_a_row, last, saved_step, stopped = 0, {}, step, None
    try:
        while step < max_steps:
            # Every rank learns whether any rank got a stop signal, at the same step boundary.
            stopped = preemption.should_stop()
            if stopped:
                break
            t0 = time.perf_counter()
            mark_progress(denv.rank, step + 1, "loading data")
            micro_batches = loader.next_step()
            t_data = time.perf_counter() - t0
            if cfg.debug.record_samples:
                record_samples(run_dir, denv.rank, step + 1, micro_batches)
            if cfg.debug.hang_at_step == step + 1 and cfg.debug.hang_rank == denv.rank:
                while True:  # a rank stuck outside any collective (a dead mount, a deadlock)
                    time.sleep(1)
            mark_progress(denv.rank, step + 1, "computing")
            skipped_before, losses = engine.skipped_steps, []
            for mb in micro_batches:
                batch = mb.tokens.to(device())
                loss = engine(batch[:, :-1], targets=batch[:, 1:]).loss
                if step + 1 in cfg.debug.nan_loss_at_steps:
                    loss = loss * float("nan")
                engine.backward(loss)
                engine.step()
                losses.append(loss)
            step += 1
            tokens += tokens_per_step
            meter.add(tokens_per_step, time.perf_counter() - t0, t_data)
            loss_value = all_mean(losses)
            if step - point.step == cfg.launch.timeout_after_steps:
                timeout = cfg.launch.timeout if set_timeout(cfg.launch.timeout) else timeout
            if engine.skipped_steps > skipped_before:
                skipped_in_a_row += 1
                log0(denv, f"step {step}: non-finite loss or gradients, update skipped")
                if skipped_in_a_row >= cfg.train.max_consecutive_skips:
                    raise RuntimeError(
                        f"{skipped_in_a_row} consecutive steps had non-finite loss or gradients "
                        f"(last at step {step}); stopping. Lower optim.lr or resume from an "
                        "earlier checkpoint."
                    )
            else:
                skipped_in_a_row = 0

            if step % cfg.tracking.log_interval == 0 or step == max_steps:
                grad_norm = engine.get_global_grad_norm()
                last = {
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                    "tokens_seen": tokens,
                    "skipped_steps": engine.skipped_steps,
                    **meter.rates(),
                }
                meter.reset()
                tracker.log(last, step)
                if denv.is_main:
                    write_metrics(run_dir / "metrics.jsonl", step, last)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}", tok_s=f"{last.get('tokens_per_second', 0):.0f}"
                )
                if not interactive:
                    log0(denv, f"step {step} {format_metrics(last)}")
            bar.update(1)
            if cfg.train.eval_interval and (
                step % cfg.train.eval_interval == 0 or step == max_steps
            ):
                val = evaluate(engine, cfg, common)
                tracker.log(val, step)
                if denv.is_main and val:
                    write_metrics(run_dir / "metrics.jsonl", step, val)
                log0(denv, f"step {step}: {format_metrics(val)}")
            interval = cfg.checkpoint.interval
            if (interval and step % interval == 0) or step == max_steps:
                checkpoint()
                saved_step = step
                if cfg.debug.kill_after_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
        if stopped:
            log0(denv, f"stopping at step {step}: {stopped}")
            if step == point.step and "wall-time" in stopped:
                raise RuntimeError(
                    f"the wall-time guard stopped the run before its first step ({stopped}): "
                    f"launch.walltime_margin={cfg.launch.walltime_margin} s is more than the "
                    "allocation leaves; lower it or ask for more time (a requeue would loop)"
                )
            if step > saved_step:
                checkpoint()
    except train_state.DiskFullError:
        tracker.finish(train_state.DISK_FULL_EXIT)  # quietly: no W&B crash report at exit
        raise
    except Exception as e:
        tqdm.write(failure_message(denv, step + 1, e), file=sys.stderr)
        raise
    finally:
        bar.close()
        loader.close()
    if stopped:
        tracker.mark_preempting()
        tracker.finish(REQUEUE_EXIT)
        return {"step": step, "tokens": tokens, "stopped": stopped, **last}
    tracker.summary({"final_loss": last.get("loss"), "steps": step, "tokens": tokens})
    tracker.finish()
    log0(denv, f"done: {step} steps, {tokens} tokens")
    log0(denv, f"  run dir:     {run_dir} (config.yaml, metrics.jsonl)")
    newest = ckpt.find_latest(run_dir / "checkpoints", checksums=False)
    log0(denv, f"  checkpoints: {newest or 'none'}")
    if tracker.run_path:
        log0(denv, f"  W&B files:   {tracker.run_path} (wandb sync {tracker.run_path})")
    return {"step": step, "tokens": tokens, **last}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="titans-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML (configs/experiments/...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    # torch.distributed's own deprecation notices, raised inside DeepSpeed on every collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    try:  # before the slow start-up: seq_len, vocabulary and every shard present (local data)
        check_sources(cfg.data.train, cfg.train.seq_len, cfg.model.vocab_size)
    except DataError as e:
        sys.exit(f"data error: {e}")
    if cfg.checkpoint.private:
        os.umask(0o077)  # before any file or directory of the run exists (docs/checkpoints.md)
    denv = env_from_launcher()
    # Before the slow start-up: a signal that arrives while DeepSpeed initialises is kept.
    preemption = Preemption(denv.rank, cfg.launch.walltime_margin, cfg.launch.walltime_poll)
    denv = init_distributed(cfg.launch.startup_timeout)
    try:
        validate(cfg, args.config, world_size=denv.world_size, overrides=args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    lock = None
    try:
        lock = take_run_lock(
            cfg.run_path, denv.is_main, cfg.checkpoint.break_lock, cfg.checkpoint.private
        )
        for note in lock.notes if lock else ():
            log0(denv, note)
        result = train(cfg, denv, preemption)
    except train_state.DiskFullError as e:
        print(f"rank {denv.rank}: error: {e}", file=sys.stderr)
        sys.exit(train_state.DISK_FULL_EXIT)
    except (ckpt.CheckpointError, RunLockError) as e:  # handled: the message says what to do
        log0(denv, f"error: {e}")
        sys.exit(1)
    except RuntimeError as e:
        log0(denv, f"error: {e}")
        raise
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    if "stopped" in result:
        exit_for_requeue(result["stopped"], result["step"], denv.local_rank)


if __name__ == "__main__":
    main()
