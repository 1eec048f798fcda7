"""Callbacks that decide whether the run goes on: preemption and the wall-time guard, the
collective timeout after start-up, and the limit on non-finite steps in a row."""

from __future__ import annotations

from titans_train.callbacks.base import Callback, StepResult
from titans_train.distributed import set_timeout
from titans_train.preemption import Preemption, thin_margin_warning


class PreemptionStop(Callback):
    """Before each step every rank learns whether any rank got a stop signal or the wall-time
    guard fired, at the same step boundary (preemption.py); the run then checkpoints and exits
    for a requeue."""

    def __init__(self, preemption: Preemption, walltime_margin: float):
        self.preemption, self.margin = preemption, walltime_margin

    def before_step(self, trainer) -> None:
        reason = self.preemption.should_stop()
        if reason:
            trainer.request_stop(reason)

    def on_checkpoint(self, trainer, path, seconds: float) -> None:
        if self.preemption.seconds_left() is not None:  # under a SLURM time limit
            warning = thin_margin_warning(seconds, self.margin)
            if warning:
                trainer.log_main(warning)

    def on_stop(self, trainer, reason: str) -> None:
        trainer.log_main(f"stopping at step {trainer.step}: {reason}")
        if trainer.step == trainer.start_step and "wall-time" in reason:
            raise RuntimeError(
                f"the wall-time guard stopped the run before its first step ({reason}): "
                f"launch.walltime_margin={self.margin} s is more than the allocation leaves; "
                "lower it or ask for more time (a requeue would loop)"
            )


class CollectiveTimeout(Callback):
    """The long start-up timeout holds until ``after_steps`` steps of this attempt are done
    (JIT builds, compiles, loads); then a rank that stops answering fails the run in
    ``seconds``."""

    def __init__(self, seconds: float, after_steps: int):
        self.seconds, self.after_steps = seconds, after_steps

    def after_step(self, trainer, result: StepResult) -> None:
        if trainer.step - trainer.start_step == self.after_steps and set_timeout(self.seconds):
            trainer.collective_timeout = self.seconds


class SkipGuard(Callback):
    """Logs each skipped (non-finite) update; stops the run after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def after_step(self, trainer, result: StepResult) -> None:
        if not result.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        trainer.log_main(f"step {trainer.step}: non-finite loss or gradients, update skipped")
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} consecutive steps had non-finite loss or gradients "
                f"(last at step {trainer.step}); stopping. Lower optim.lr or resume from an "
                "earlier checkpoint."
            )
