"""Helpers for end-to-end trainer tests: demo shards, a 2-process training run, its metrics."""

import json
import subprocess
import sys
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


def train(data, run_dir, steps, *overrides, nproc=2, check=True, timeout=600):
    """One `titans-train` run under torchrun; W&B offline files stay inside run_dir."""
    env = clean_env(WANDB_MODE="offline", **wandb_home(Path(run_dir) / "wandb-home"))
    args = ["titans_train.cli", "--config", str(EXPERIMENT)]
    args += base_overrides(data, run_dir, steps) + list(overrides)
    return torchrun("-m", *args, nproc=nproc, env=env, check=check, timeout=timeout)


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
