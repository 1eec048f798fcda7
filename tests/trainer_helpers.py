"""Helpers for end-to-end trainer tests: demo shards, a 2-process training run, its metrics."""

import io
import json
import os
import signal
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from distributed import ROOT, torchrun
from wandb_helpers import clean_env, wandb_home

EXPERIMENT = ROOT / "configs" / "experiments" / "tiny_mac.yaml"
SHARED_STEPS = 20  # the shared runs (conftest.py's zero_run): checkpoints at steps 10 and 20


def build_demo(out: Path, seq_len: int = 128) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.demo",
        "--out",
        str(out),
        "--seq-len",
        str(seq_len),
        "--max-mb",
        "2",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    return out


def base_overrides(data: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"data.train=[{data}]",
        f"run_dir={run_dir}",
        "train.seq_len=128",
        "train.global_batch=8",
        "train.micro_batch=2",
        f"train.max_steps={steps}",
        "train.eval_interval=0",
        "optim.warmup_steps=2",
        "tracking.log_interval=1",
        "tracking.mode=offline",
        f"checkpoint.interval={steps}",
    ]


# A 1-block, width-32 model for in-process trainer runs (seconds each).
TINY = ["model.depth=1", "model.dim=32", "model.heads=2", "tracking.mode=disabled"]


def in_process_trainer(data, run_dir, steps, *overrides, process_group):
    """A Trainer in this process (the ``process_group`` fixture's one rank) for ``base_overrides``
    + TINY + ``overrides``, with the default callbacks; not yet set up."""
    from titans_train.callbacks import default_callbacks
    from titans_train.config_load import load_config
    from titans_train.preemption import Preemption
    from titans_train.trainer import Trainer

    cfg = load_config(EXPERIMENT, [*base_overrides(data, run_dir, steps), *TINY, *overrides])
    return Trainer(cfg, process_group, default_callbacks(cfg, process_group, Preemption(0)))


def train(data, run_dir, steps, *overrides, nproc=2, check=True, timeout=600):
    """One `titans-train` run under torchrun; W&B offline files stay inside run_dir."""
    env = clean_env(WANDB_MODE="offline", **wandb_home(Path(run_dir) / "wandb-home"))
    args = ["titans_train.cli", "--config", str(EXPERIMENT)]
    args += base_overrides(data, run_dir, steps) + list(overrides)
    return torchrun("-m", *args, nproc=nproc, env=env, check=check, timeout=timeout)


@dataclass
class Ran:
    """What a `titans-train` run inside this process left: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str


def train_here(data, run_dir, steps, *overrides) -> Ran:
    """`titans-train` as one process, inside this one: train.main with the launch variables of
    a lone process, so the same checks, run lock, messages and exit codes as a launch, without
    its 10-20 s of imports and DeepSpeed start-up. For tests of what the trainer does; what the
    launcher does (locks across processes, signals, SIGKILL, torchrun) needs a real launch.
    W&B is off (tracking.mode=disabled): its service would stay in this process. What the run
    changes in this process (launch variables, stop-signal handlers, umask, the process group
    and DeepSpeed's cached groups) is undone afterwards."""
    from titans_train import train as train_cli
    from titans_train.distributed import free_port

    argv = ["--config", str(EXPERIMENT), *base_overrides(data, run_dir, steps)]
    argv += ["tracking.mode=disabled", *overrides]
    launch = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    launch["MASTER_PORT"] = str(free_port())
    saved_env = {k: os.environ.get(k) for k in launch}
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    umask = os.umask(0o022)
    os.umask(umask)
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update(launch)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                train_cli.main(argv)
            except SystemExit as e:  # as the interpreter would report it
                code = e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        _undo_run(saved_env, saved_signals, umask)
    return Ran(code, out.getvalue(), err.getvalue())


def _undo_run(saved_env: dict, saved_signals: dict, umask: int) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    forget_deepspeed_groups()
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for sig, handler in saved_signals.items():
        signal.signal(sig, handler)
    os.umask(umask)


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches groups it cloned from the world group (deepspeed.utils.groups); after
    the world group is destroyed they are stale, and the next engine in this process would fail
    on them ("Group ... is not registered")."""
    from deepspeed.utils import groups

    for name, value in vars(groups).items():
        if name.startswith("_") and name.endswith("_GROUP"):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def shared_run_args(stage: int, variant: str = "mac") -> list[str]:
    """Overrides of the shared runs; a run that must match one (a resumed copy) uses them too."""
    extra = ["runtime.activation_checkpointing=true"] if stage == 3 else []
    interval = f"checkpoint.interval={SHARED_STEPS // 2}"
    return [f"model.variant={variant}", f"zero.stage={stage}", interval, *extra]


def metrics(run_dir, headers: bool = False) -> list[dict]:
    """metrics.jsonl's rows; the {"header": ...} line of each (re)start only with ``headers``."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows if headers else [r for r in rows if "header" not in r]


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def consolidated(checkpoint_dir: Path) -> dict:
    """Full fp32 parameters of a ZeRO checkpoint, via DeepSpeed's own consolidation."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), checkpoint_dir.name)
