"""Work done every N steps: validation and checkpoints."""

from __future__ import annotations

from titans_train.callbacks.base import Callback, StepResult
from titans_train.config import Config
from titans_train.validation import validation_loss


def due(step: int, interval: int, last: int) -> bool:
    """Every ``interval`` steps (0 = never) and at the last step."""
    return bool(interval) and step % interval == 0 or step == last


class Validation(Callback):
    """Loss and perplexity over ``train.eval_batches`` global batches of the val split."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    def after_step(self, trainer, result: StepResult) -> None:
        t = self.cfg.train
        if not t.eval_interval or not due(trainer.step, t.eval_interval, trainer.max_steps):
            return
        data = self.cfg.data
        with data.build_val_loader(t, self.cfg.model.vocab_size, self.rank, self.world_size) as val:
            metrics = validation_loss(trainer.engine, val, t.eval_batches, t.burn_in)
        trainer.log(metrics, "val")


class Checkpointing(Callback):
    """A checkpoint every ``interval`` steps (0 = only at the end) and at the last step; on a
    stop, one of the step reached unless it is already saved."""

    def __init__(self, interval: int):
        self.interval = interval

    def after_step(self, trainer, result: StepResult) -> None:
        if due(trainer.step, self.interval, trainer.max_steps):
            trainer.save_checkpoint()

    def on_stop(self, trainer, reason: str) -> None:
        if trainer.step > trainer.saved_step:
            trainer.save_checkpoint()
