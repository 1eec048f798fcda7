"""The callback base class: cross-cutting work hangs off the training loop here (OLMo-core's
pattern), so that ``Trainer.fit`` reads top to bottom.

Hooks run in list order. ``state_dict`` entries are stored at the top level of the checkpoint's
trainer state and handed back to ``load_state_dict`` on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from titans_train.data import MicroBatch
    from titans_train.trainer import Trainer


@dataclass
class StepResult:
    """What one optimizer step produced (``Trainer.train_step``), timed by ``fit``."""

    loss: float  # mean over this step's micro-batches and all ranks
    skipped: bool  # the update was skipped: non-finite loss or gradients
    seconds: float = 0.0  # the whole step, data included
    data_seconds: float = 0.0  # waiting for the loader


class Callback:
    """Every hook is optional. ``trainer`` exposes cfg, denv, step, tokens, engine, loader,
    scheduler, log(), save_checkpoint() and request_stop()."""

    def setup(self, trainer: Trainer) -> None:
        """The engine is built and, on resume, restored; nothing trained yet."""

    def before_step(self, trainer: Trainer) -> None:
        """Before step ``trainer.step + 1`` loads its data; may call trainer.request_stop()."""

    def on_batch(self, trainer: Trainer, micro_batches: list[MicroBatch]) -> None:
        """This rank's micro-batches of step ``trainer.step + 1`` are loaded."""

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        """Step ``trainer.step`` is done (``trainer.step`` already counts it)."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float], kind: str) -> None:
        """``metrics`` were logged at ``trainer.step``; ``kind`` is "train" or "val"."""

    def on_checkpoint(self, trainer: Trainer, path: Any, seconds: float) -> None:
        """A checkpoint of ``trainer.step`` committed at ``path`` after ``seconds``."""

    def on_stop(self, trainer: Trainer, reason: str) -> None:
        """A stop was requested (``reason``); before the final checkpoint."""

    def on_finish(self, trainer: Trainer) -> None:
        """The run ended normally or stopped (``trainer.stop_reason``), all checkpoints saved."""

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        """The loop raised ``error`` (re-raised after every callback saw it)."""

    def close(self, trainer: Trainer) -> None:
        """Always last, after success or error: release what setup() took."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """``state`` is the whole trainer state of the checkpoint resumed from."""


class Callbacks:
    """The callbacks of one run, called in order."""

    def __init__(self, callbacks: list[Callback]):
        self.items = list(callbacks)

    def __call__(self, hook: str, *args) -> None:
        for cb in self.items:
            getattr(cb, hook)(*args)

    def state_dict(self) -> dict:
        state: dict = {}
        for cb in self.items:
            state.update(cb.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        for cb in self.items:
            cb.load_state_dict(state)
