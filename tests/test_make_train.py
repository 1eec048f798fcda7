"""The README's main job, `make train`, end to end at tiny settings; its outputs are checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import ROOT
from wandb_helpers import clean_env, history, read_records, wandb_home

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_make_train(tmp_path):
    run_dir, demo = tmp_path / "run", tmp_path / "demo"
    args = (
        f"run_dir={run_dir} train.max_steps=20 checkpoint.interval=10 train.eval_interval=10 "
        "tracking.log_interval=5"
    )
    cmd = [
        "make",
        "train",
        f"VENV={sys.prefix}",
        "SKIP_INSTALL=1",
        f"DEMO_DIR={demo}",
        f"TRAIN_ARGS={args}",
    ]
    env = clean_env(WANDB_MODE="offline", **wandb_home(tmp_path / "wandb-home"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (demo / "manifest.json").is_file()
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000020"
    assert (ckpts / "step_00000020" / "COMPLETE").is_file()
    assert not (ckpts / "step_00000010").exists() or (ckpts / "step_00000010" / "COMPLETE").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert any("val/loss" in r for r in rows)
    (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert set(history(read_records(wandb_run))) >= {5, 10, 15, 20}
    # It says where everything is.
    for what in (
        f"run dir:     {run_dir}",
        f"checkpoints: {ckpts / 'step_00000020'}",
        "W&B files:",
    ):
        assert what in proc.stderr
    assert Path(run_dir / "config.yaml").is_file()
