"""Callbacks on the training loop (base.py), and the standard set a run gets."""

from __future__ import annotations

from titans_train.callbacks.base import Callback, Callbacks, StepResult
from titans_train.callbacks.cadence import Checkpointing, Validation
from titans_train.callbacks.console import Console, StepMetrics
from titans_train.callbacks.faults import FaultInjection
from titans_train.callbacks.metrics_file import MetricsFile
from titans_train.callbacks.run_guards import CollectiveTimeout, PreemptionStop, SkipGuard
from titans_train.callbacks.wandb_run import WandbRun
from titans_train.config import Config, DebugConfig
from titans_train.distributed import DistEnv
from titans_train.preemption import Preemption
from titans_train.run_dir import RunDir

__all__ = ["Callback", "Callbacks", "StepResult", "default_callbacks"]


def default_callbacks(cfg: Config, denv: DistEnv, preemption: Preemption) -> list[Callback]:
    """In the order they run: stop decisions first; after a step, the guards, then the metrics
    and their sinks, then validation, then the checkpoint."""
    run = RunDir(cfg.run_path)
    callbacks: list[Callback] = [PreemptionStop(preemption, cfg.launch.walltime_margin)]
    if cfg.debug != DebugConfig():  # a test asked for a fault
        callbacks.append(FaultInjection(cfg.debug, denv.rank, run))
    callbacks += [
        CollectiveTimeout(cfg.launch.timeout, cfg.launch.timeout_after_steps),
        SkipGuard(cfg.train.max_consecutive_skips),
        StepMetrics(cfg.tracking.log_interval, cfg.train.peak_tflops),
        MetricsFile(run.metrics, denv.is_main),
        Console(denv.is_main),
        WandbRun(cfg, denv.rank),
        Validation(cfg, denv.rank, denv.world_size),
        Checkpointing(cfg.checkpoint.interval),
    ]
    return callbacks
