"""What a person watching the run sees: the step metrics it logs, a progress bar on a terminal
(in a log file, as under SLURM, one plain line per logged step), and the closing footer."""

from __future__ import annotations

import sys

from tqdm import tqdm

from titans_train import checkpoint as ckpt
from titans_train.callbacks.base import Callback, StepResult
from titans_train.distributed import failure_message
from titans_train.metrics import StepMeter, peak_flops_per_device
from titans_train.tracking import format_metrics
from titans_train.train_state import DiskFullError


class StepMetrics(Callback):
    """Every ``interval`` steps (and at the last): loss, lr, gradient norm, tokens, skips and
    the meter's rates, handed to ``trainer.log`` for the files, W&B and the console."""

    def __init__(self, interval: int, peak_tflops: float | None):
        self.interval, self.peak_tflops = interval, peak_tflops
        self.meter: StepMeter | None = None

    def setup(self, trainer) -> None:
        cfg = trainer.cfg
        peak, source = peak_flops_per_device(self.peak_tflops)
        self.meter = StepMeter(cfg.model, cfg.train.seq_len, trainer.denv.world_size, peak)
        params = trainer.engine.module.num_params()
        trainer.log_main(f"{params / 1e6:.2f}M parameters; MFU against {source}")

    def after_step(self, trainer, result: StepResult) -> None:
        self.meter.add(trainer.tokens_per_step, result.seconds, result.data_seconds)
        if trainer.step % self.interval and trainer.step != trainer.max_steps:
            return
        grad_norm = trainer.engine.get_global_grad_norm()
        metrics = {
            "loss": result.loss,
            "lr": trainer.scheduler.get_last_lr()[0],
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "tokens_seen": trainer.tokens,
            "skipped_steps": trainer.engine.skipped_steps,
            **self.meter.rates(),
        }
        self.meter.reset()
        trainer.log(metrics, "train")


class Console(Callback):
    def __init__(self, is_main: bool):
        self.interactive = is_main and sys.stderr.isatty()
        self.bar: tqdm | None = None

    def setup(self, trainer) -> None:
        self.bar = tqdm(
            total=trainer.max_steps,
            initial=trainer.step,
            disable=not self.interactive,
            unit="step",
            dynamic_ncols=True,
        )

    def after_step(self, trainer, result: StepResult) -> None:
        self.bar.update(1)

    def on_log(self, trainer, metrics: dict, kind: str) -> None:
        if kind == "val":
            trainer.log_main(f"step {trainer.step}: {format_metrics(metrics)}")
            return
        tok_s = metrics.get("tokens_per_second", 0)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:.0f}")
        if not self.interactive:
            trainer.log_main(f"step {trainer.step} {format_metrics(metrics)}")

    def on_finish(self, trainer) -> None:
        if trainer.stop_reason:
            return
        trainer.log_main(f"done: {trainer.step} steps, {trainer.tokens} tokens")
        trainer.log_main(f"  run dir:     {trainer.run.path} (config.yaml, metrics.jsonl)")
        newest = ckpt.find_latest(trainer.run.checkpoints, checksums=False)
        trainer.log_main(f"  checkpoints: {newest or 'none'}")

    def on_error(self, trainer, error: BaseException) -> None:
        if not isinstance(error, DiskFullError):  # that one's message is already complete
            tqdm.write(failure_message(trainer.denv, trainer.step + 1, error), file=sys.stderr)

    def close(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
