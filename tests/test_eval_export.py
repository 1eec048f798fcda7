"""Real checkpoints from the trainer (2 gloo processes, ZeRO 0, 2 and 3: conftest.py's shared
zero_run): export round trip against the logits of a DeepSpeed engine that loaded the checkpoint,
titans-eval with W&B, and clear messages for missing, corrupt and mismatched checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from distributed import ROOT, torchrun
from trainer_helpers import SHARED_STEPS
from wandb_helpers import clean_env, read_records, run_record, wandb_home

from titans_train import evaluate, export
from titans_train.models import TitansLM
from titans_train.pretrained import load_pretrained

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STAGES = (0, 2, 3)


def step_dir(run):
    return run / "checkpoints" / f"step_{SHARED_STEPS:08d}"  # the newest


@pytest.fixture(scope="module")
def runs(zero_run, tmp_path_factory):
    """The shared run of each ZeRO stage, then the engines' logits on their newest checkpoints."""
    out = {s: zero_run(s) for s in STAGES}
    ref = tmp_path_factory.mktemp("logits") / "logits.pt"
    script = ROOT / "tests" / "scripts" / "checkpoint_logits.py"
    torchrun(script, str(ref), *(str(step_dir(out[s])) for s in STAGES))
    return out, torch.load(ref)


@pytest.mark.parametrize("stage", STAGES)
def test_export_round_trip_matches_the_engine(runs, demo_shards, tmp_path, stage, capsys):
    paths, ref = runs
    out = tmp_path / "export"
    argv = ["--checkpoint", str(paths[stage]), "--out", str(out), "--data", str(demo_shards)]
    assert export.main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"]["name"] == "bytes" and config["source"]["step"] == SHARED_STEPS
    model = load_pretrained(str(out))
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    want = ref["logits"][str(step_dir(paths[stage]))]
    assert (logits - want).abs().max().item() < 1e-5
    # Trained, not the initialisation: the weights moved away from a fresh model's.
    fresh = TitansLM(model.cfg)
    assert not torch.allclose(fresh.head.weight, model.head.weight)


def test_eval_logs_into_the_training_run(runs, demo_shards, tmp_path):
    run = tmp_path / "run"  # a copy: the shared run's W&B files stay as training left them
    shutil.copytree(runs[0][2], run)
    out = tmp_path / "eval.json"
    env = clean_env(WANDB_MODE="offline", **wandb_home(tmp_path / "home"))
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "titans_train.evaluate", "--checkpoint", "latest"]
    cmd += ["--run", str(run), "--data", str(demo_shards), "--lengths", "128,256"]
    # A few windows of perplexity: the default (the whole split) is test_eval_cli.py's.
    cmd += ["--suites", "ppl,passkey,mqar", "--samples", "2", "--pairs", "3"]
    cmd += ["--ppl-tokens", "1024"]
    cmd += ["--json", str(out), "--wandb"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppl" in proc.stdout and "mqar exact%" in proc.stdout
    result = json.loads(out.read_text())
    assert result["model"]["step"] == SHARED_STEPS and set(result["results"]) == {
        "ppl",
        "passkey",
        "mqar",
    }
    assert result["results"]["mqar"]["256"]["answers"] == 6
    run_id = json.loads((step_dir(run) / "trainer_state.json").read_text())["wandb_run_id"]
    segments = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2  # training, then evaluation: one W&B run
    records = read_records(segments[-1])
    assert run_record(records)["run_id"] == run_id
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["eval/ppl@128"] == pytest.approx(result["results"]["ppl"]["128"]["ppl"])
    assert summary["eval/mqar@256"] == result["results"]["mqar"]["256"]["accuracy"]
    assert summary["eval/checkpoint_step"] == SHARED_STEPS


def bad_copy(runs, tmp_path):
    src = step_dir(runs[0][0])
    dst = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return dst


def drop_checksums(path):
    """COMPLETE as a checkpoint from before checksums has it: sizes only."""
    marker = json.loads((path / "COMPLETE").read_text())
    marker.pop("digests", None)
    (path / "COMPLETE").write_text(json.dumps(marker))


def eval_error(capsys, *argv) -> str:
    assert evaluate.main(["--suites", "ppl", "--lengths", "128", *argv]) == 2
    return capsys.readouterr().err


def test_bad_checkpoints_name_the_path_and_the_problem(runs, demo_shards, tmp_path, capsys):
    missing = tmp_path / "step_00000099"
    assert f"no such checkpoint directory: {missing}" in eval_error(
        capsys, "--checkpoint", str(missing)
    )
    assert "--checkpoint latest needs --run" in eval_error(capsys, "--checkpoint", "latest")

    truncated = bad_copy(runs, tmp_path / "t")
    weights = truncated / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = eval_error(capsys, "--checkpoint", str(truncated))
    assert f"checkpoint {truncated} is unusable: truncated file mp_rank_00_model_states.pt" in err

    corrupt = bad_copy(runs, tmp_path / "c")
    weights = corrupt / "mp_rank_00_model_states.pt"
    weights.write_bytes(b"\x00" * weights.stat().st_size)  # same size: the checksum tells
    err = eval_error(capsys, "--checkpoint", str(corrupt))
    assert f"{corrupt} is unusable: checksum mismatch in file mp_rank_00_model_states.pt" in err
    drop_checksums(corrupt)  # as written before checksums: only loading can tell
    assert f"cannot read the ZeRO-0 weights of {corrupt}" in eval_error(
        capsys, "--checkpoint", str(corrupt)
    )

    mismatched = bad_copy(runs, tmp_path / "m")
    state = mismatched / "trainer_state.json"
    text = state.read_text()
    assert '"dim": 64' in text
    state.write_text(text.replace('"dim": 64', '"dim": 32'))  # same size
    drop_checksums(mismatched)
    err = eval_error(capsys, "--checkpoint", str(mismatched))
    assert f"{mismatched}: weights do not match the model config in trainer_state.json" in err
    assert "embed.weight: checkpoint [320, 64] vs config [320, 32]" in err

    other = tmp_path / "other-data"
    shutil.copytree(demo_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"].update(name="bpe.json", kind="tokenizers", sha256="f" * 64)
    (other / "manifest.json").write_text(json.dumps(manifest))
    err = eval_error(capsys, "--checkpoint", str(runs[0][0]), "--data", str(other))
    assert f"{other}" in err and "tokenizer 'bpe.json'" in err and "'bytes'" in err
