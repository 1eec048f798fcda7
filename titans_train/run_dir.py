"""The run directory's layout, named in one place (docs/checkpoints.md):

    <run>/                      runs/<name> unless run_dir is set
      config.yaml               the resolved (redacted) config of the latest start
      metrics.jsonl             one JSON line per logged step, a header line per start
      .lock                     one run at a time (run_lock.py)
      samples.rank<R>.jsonl     debug.record_samples only
      wandb/                    W&B's files (under tracking.dir when set) and our step marker
      checkpoints/
        latest                  names the newest committed step directory (a hint)
        step_XXXXXXXX/          one checkpoint: engine files, trainer_state.json, COMPLETE
        previous-<UTC time>/    step directories set aside by checkpoint.resume=never

What lies inside a step directory is checkpoint.py's business; this module only places things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = ".lock"
WANDB = "wandb"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    """``step_00000042``: fixed width, so names sort like steps."""
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunDir:
    """Where each artifact of one training run lives. Paths only: nothing is read or created
    except by ``create``."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a ``<run>/checkpoints/step_XXXXXXXX`` directory belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def samples(self, rank: int) -> Path:
        return self.path / f"samples.rank{rank}.jsonl"

    @property
    def wandb(self) -> Path:
        """W&B's folder when tracking.dir is unset (wandb.init(dir=<run>) writes <run>/wandb)."""
        return self.path / WANDB

    def create(self) -> None:
        """The run directory and its checkpoints/ folder (rank 0, before anything is written)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
