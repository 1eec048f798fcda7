"""Fault injection for tests (``debug.*`` keys): installed only when a key is set, so the
production loop has no test branches. Each fault acts through the real components: the loss the
model returns, the engine's checkpoint writer, the process itself."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

from titans_train.callbacks.base import Callback, StepResult
from titans_train.config import DebugConfig
from titans_train.run_dir import RunDir


class FaultInjection(Callback):
    def __init__(self, debug: DebugConfig, rank: int, run: RunDir):
        self.debug, self.rank, self.run = debug, rank, run
        self._nan_hook = None

    def on_batch(self, trainer, micro_batches) -> None:
        step, d = trainer.step + 1, self.debug
        if d.record_samples:  # the (source, shard, row) ids this rank trains on
            ids = [row for mb in micro_batches for row in mb.sample_ids.tolist()]
            with open(self.run.samples(self.rank), "a") as f:
                f.write(json.dumps({"step": step, "samples": ids}) + "\n")
        if d.hang_at_step == step and d.hang_rank == self.rank:
            while True:  # a rank stuck outside any collective (a dead mount, a deadlock)
                time.sleep(1)
        if step in d.nan_loss_at_steps:
            self._nan_hook = trainer.engine.module.register_forward_hook(_poison_loss)
        if d.enospc_at_step == step:
            _fill_disk_on_save(trainer.engine)

    def after_step(self, trainer, result: StepResult) -> None:
        if self._nan_hook is not None:
            self._nan_hook.remove()
            self._nan_hook = None

    def on_checkpoint(self, trainer, path, seconds: float) -> None:
        if self.debug.kill_after_step == trainer.step:  # every rank, once it is committed
            os.kill(os.getpid(), signal.SIGKILL)


def _poison_loss(module, args, output):
    output.loss = output.loss * float("nan")
    return output


def _fill_disk_on_save(engine) -> None:
    """The engine's next checkpoint files are written, then the disk is 'full' (ENOSPC)."""
    save = engine.save_checkpoint

    def full(save_dir: str, tag: str, **kwargs):
        del engine.save_checkpoint  # once: the class's method again
        save(save_dir, tag=tag, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(save_dir) / tag))

    engine.save_checkpoint = full
