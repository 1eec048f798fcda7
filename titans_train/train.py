"""``titans-train --config configs/experiments/X.yaml key=value ...``: checks the config and the
data, joins the process group, takes the run lock, and fits a Trainer (trainer.py) with the
standard callbacks (callbacks/). Exit codes: 0 done, 1 a handled error, REQUEUE_EXIT after a
preemption checkpoint, DISK_FULL_EXIT when a checkpoint did not fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch.distributed as dist
from tqdm import tqdm

from titans_train import checkpoint as ckpt
from titans_train import train_state
from titans_train.callbacks import default_callbacks
from titans_train.config import ConfigError
from titans_train.config_load import load_config, validate
from titans_train.data import DataError, check_sources
from titans_train.distributed import env_from_launcher, init_distributed
from titans_train.preemption import exit_for_requeue
from titans_train.run_lock import RunLockError, take_run_lock
from titans_train.trainer import Trainer


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
    try:  # before the slow start-up: seq_len, vocabulary and every shard present (local data)
        check_sources(cfg.data.train, cfg.train.seq_len, cfg.model.vocab_size)
    except DataError as e:
        sys.exit(f"data error: {e}")
    if cfg.checkpoint.private:
        os.umask(0o077)  # before any file or directory of the run exists (docs/checkpoints.md)
    # Before the slow start-up: a signal that arrives while DeepSpeed initialises is kept.
    preemption = cfg.launch.build_preemption(env_from_launcher().rank)
    denv = init_distributed(cfg.launch.startup_timeout)
    try:
        validate(cfg, args.config, world_size=denv.world_size, overrides=args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    def say(msg: str) -> None:
        if denv.is_main:
            tqdm.write(msg, file=sys.stderr)

    lock = None
    try:
        lock = take_run_lock(
            cfg.run_path, denv.is_main, cfg.checkpoint.break_lock, cfg.checkpoint.private
        )
        for note in lock.notes if lock else ():
            say(note)
        result = Trainer(cfg, denv, default_callbacks(cfg, denv, preemption)).fit()
    except train_state.DiskFullError as e:
        print(f"rank {denv.rank}: error: {e}", file=sys.stderr)
        sys.exit(train_state.DISK_FULL_EXIT)
    except (ckpt.CheckpointError, RunLockError) as e:  # handled: the message says what to do
        say(f"error: {e}")
        sys.exit(1)
    except RuntimeError as e:
        say(f"error: {e}")
        raise
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    if "stopped" in result:
        exit_for_requeue(result["stopped"], result["step"], denv.local_rank)


if __name__ == "__main__":
    main()
