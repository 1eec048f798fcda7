"""The W&B run (tracking.py's Tracker) as a callback: opened at setup with the run id the
checkpoint carries, fed every logged metric, finished with the exit status the run will have."""

from __future__ import annotations

from titans_train.callbacks.base import Callback
from titans_train.config import Config, public_dict
from titans_train.preemption import REQUEUE_EXIT
from titans_train.tracking import Tracker
from titans_train.train_state import DISK_FULL_EXIT, DiskFullError


class WandbRun(Callback):
    def __init__(self, cfg: Config, rank: int):
        self.cfg, self.rank = cfg, rank
        self.run_id: str | None = None
        self.tracker: Tracker | None = None

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("wandb_run_id")

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.tracker.run_id if self.tracker else self.run_id}

    def setup(self, trainer) -> None:
        cfg = self.cfg
        self.tracker = Tracker(
            cfg.tracking,
            run_dir=trainer.run.path,
            run_name=cfg.name,
            config={**public_dict(cfg), "attention_backend": trainer.attention},
            rank=self.rank,
            run_id=self.run_id,
            resume_step=trainer.step if trainer.resumed else None,
        )

    def on_log(self, trainer, metrics: dict, kind: str) -> None:
        self.tracker.log(metrics, trainer.step)

    def on_finish(self, trainer) -> None:
        if trainer.stop_reason:
            self.tracker.mark_preempting()
            self.tracker.finish(REQUEUE_EXIT)
            return
        final = trainer.last_metrics.get("loss")
        self.tracker.summary({"final_loss": final, "steps": trainer.step, "tokens": trainer.tokens})
        self.tracker.finish()
        if self.tracker.run_path:
            path = self.tracker.run_path
            trainer.log_main(f"  W&B files:   {path} (wandb sync {path})")

    def on_error(self, trainer, error: BaseException) -> None:
        if isinstance(error, DiskFullError) and self.tracker is not None:
            self.tracker.finish(DISK_FULL_EXIT)  # quietly: no W&B crash report at exit
