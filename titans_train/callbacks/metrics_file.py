"""<run>/metrics.jsonl (rank 0): one JSON line per logged step, W&B-independent.

Each (re)start opens its part with ``{"header": ...}`` (a line with no "step"). On resume the rows
logged after the checkpoint's step are dropped, since those steps are trained again.
"""

from __future__ import annotations

import json
from pathlib import Path

from titans_train.callbacks.base import Callback
from titans_train.fsutil import write_text_atomically


def write_metrics(path: Path, step: int, metrics: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def write_metrics_header(path: Path, header: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"header": header}) + "\n")


def rewind_metrics(path: Path, step: int) -> int:
    """Drop the rows logged after ``step``, atomically. Rows without a step (headers) stay; a
    torn last line goes. Returns how many were dropped."""
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


class MetricsFile(Callback):
    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def setup(self, trainer) -> None:
        if not self.is_main:
            return
        if dropped := rewind_metrics(self.path, trainer.step):
            trainer.log_main(
                f"metrics.jsonl: dropped {dropped} rows after step {trainer.step} (rewound)"
            )
        write_metrics_header(
            self.path, {"start_step": trainer.step, "attention": trainer.attention}
        )

    def on_log(self, trainer, metrics: dict, kind: str) -> None:
        if self.is_main and metrics:
            write_metrics(self.path, trainer.step, metrics)
