"""The training loop. ``titans-train --config configs/experiments/X.yaml key=value ...``

One step, top to bottom: the loader hands this rank its micro-batches of the global batch; the
model inside the DeepSpeed engine returns the loss; the engine runs backward and, at the last
micro-batch, the optimizer step (or skips it when the gradients are not finite); metrics go to
the tracker; every ``checkpoint.interval`` steps a checkpoint commits.
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

import torch
import torch.distributed as dist
from tqdm import tqdm

from titans_train import checkpoint as ckpt
from titans_train.config import Config, ConfigError, load_config, to_dict, to_yaml, validate
from titans_train.data import StreamingLoader, validation_loader
from titans_train.distributed import DistEnv, device, init_distributed
from titans_train.engine import build_engine
from titans_train.metrics import StepMeter, peak_flops_per_device
from titans_train.models import TitansLM
from titans_train.tracking import Tracker, format_metrics


def write_metrics(path, step: int, metrics: dict) -> None:
    """Append one JSON line per logged step to <run>/metrics.jsonl (rank 0): W&B-independent."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def log0(denv: DistEnv, msg: str) -> None:
    if denv.is_main:
        tqdm.write(msg, file=sys.stderr)


def all_mean(values: list[torch.Tensor]) -> float:
    """Mean over micro-batches and ranks (equal micro-batch sizes everywhere)."""
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
    total, count = torch.zeros(2, dtype=torch.float64), 0
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


def resume(cfg: Config, engine, loader: StreamingLoader, denv: DistEnv) -> dict:
    """Restore engine, data position and RNG from the checkpoint ``checkpoint.resume`` names."""
    root = cfg.run_path / "checkpoints"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ckpt.resolve_resume(cfg.checkpoint.resume, root)
    for w in caught:
        log0(denv, f"warning: {w.message}")
    if path is None:
        return {"step": 0, "tokens": 0, "wandb_run_id": None, "resumed_from": None}
    state = ckpt.load_trainer_state(path)
    protected, other = ckpt.config_diff(state["config"], to_dict(cfg))
    if protected and not cfg.checkpoint.force:
        raise ckpt.CheckpointError(
            f"{path} was trained with a different model or data config; resuming would not "
            "continue the same run. Changed:\n  " + "\n  ".join(protected) + "\n"
            "Pass checkpoint.force=true to resume anyway, or checkpoint.resume=never."
        )
    for line in protected + other:
        log0(denv, f"config changed since the checkpoint: {line}")
    if state["world_size"] != denv.world_size and cfg.zero.stage > 0:
        raise ckpt.CheckpointError(
            f"{path} was saved by {state['world_size']} ranks and this run has "
            f"{denv.world_size}: ZeRO-{cfg.zero.stage} optimizer partitions cannot be loaded "
            "directly; convert it to a universal checkpoint first (docs/checkpoints.md)."
        )
    try:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    except Exception as e:  # DeepSpeed raises many kinds; name the checkpoint in all of them
        raise ckpt.CheckpointError(f"loading {path} failed: {type(e).__name__}: {e}") from e
    if loaded is None:
        raise ckpt.CheckpointError(f"DeepSpeed found nothing to load in {path}")
    loader.load_state_dict(state["data"])
    if state["world_size"] == denv.world_size:
        ckpt.set_rng_state(state["rng"][denv.rank])
    else:
        log0(denv, "world size changed: RNG states not restored (the data order is unaffected)")
    log0(denv, f"resumed from {path} at step {state['step']}")
    return dict(state, resumed_from=str(path))


def save_checkpoint(cfg: Config, engine, loader, denv, step: int, tokens: int, run_id: str):
    root = cfg.run_path / "checkpoints"
    state = {
        "step": step,
        "tokens": tokens,
        "data": loader.state_dict(),
        "wandb_run_id": run_id,
        "config": to_dict(cfg),
        "world_size": denv.world_size,
        "skipped_steps": int(engine.skipped_steps),
    }
    path = ckpt.save(engine, root, step, state)
    if denv.is_main:
        for old in ckpt.apply_retention(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every):
            log0(denv, f"retention: removed {old}")
    return path


def train(cfg: Config, denv: DistEnv) -> dict:
    torch.manual_seed(cfg.train.seed)
    run_dir = cfg.run_path
    if denv.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log0(denv, f"resolved config:\n{to_yaml(cfg)}")

    model = TitansLM(cfg.model)
    model.activation_checkpointing = cfg.zero.activation_checkpointing
    engine, _, scheduler = build_engine(cfg, model, denv.world_size)
    loader, common = loaders(cfg, denv)
    state = resume(cfg, engine, loader, denv)
    step, tokens = state["step"], state["tokens"]
    tracker = Tracker(
        cfg.tracking,
        run_dir=run_dir,
        run_name=cfg.name,
        config=to_dict(cfg),
        rank=denv.rank,
        run_id=state["wandb_run_id"],
        resume_step=step if state["resumed_from"] else None,
    )
    peak, peak_source = peak_flops_per_device(cfg.train.peak_tflops)
    meter = StepMeter(cfg.model, cfg.train.seq_len, denv.world_size, peak)
    log0(denv, f"{model.num_params() / 1e6:.2f}M parameters; MFU against {peak_source}")
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    max_steps = cfg.train.max_steps
    if cfg.train.max_tokens:
        max_steps = min(max_steps, math.ceil(cfg.train.max_tokens / tokens_per_step))
    bar = tqdm(
        total=max_steps, initial=step, disable=not denv.is_main, unit="step", dynamic_ncols=True
    )
    skipped_in_a_row, last = 0, {}
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            micro_batches = loader.next_step()
            t_data = time.perf_counter() - t0
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
                path = save_checkpoint(cfg, engine, loader, denv, step, tokens, tracker.run_id)
                log0(denv, f"step {step}: checkpoint {path}")
                if cfg.debug.kill_after_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        loader.close()
    tracker.summary({"final_loss": last.get("loss"), "steps": step, "tokens": tokens})
    tracker.finish()
    log0(denv, f"done: {step} steps, {tokens} tokens")
    log0(denv, f"  run dir:     {run_dir} (config.yaml, metrics.jsonl)")
    log0(denv, f"  checkpoints: {ckpt.find_latest(run_dir / 'checkpoints') or 'none'}")
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
    denv = init_distributed()
    try:
        validate(cfg, args.config, world_size=denv.world_size)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    try:
        train(cfg, denv)
    except (ckpt.CheckpointError, RuntimeError) as e:
        log0(denv, f"error: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
