"""benchmarks/gpu_smoke.py --cpu-dry-run: every stage of the GPU smoke check at tiny sizes on CPU,
so the script that is run first on a new GPU cluster cannot rot (docs/gpu_smoke.md)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from distributed import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"
STAGES = ("environment", "flash_vs_fp64", "attend", "memory", "model", "trainer", "throughput")


@pytest.mark.slow
def test_cpu_dry_run_passes_every_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    cmd = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path / "smoke")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    report = json.loads((tmp_path / "smoke" / "gpu_smoke.json").read_text())
    failed = {name: r["error"] for name, r in report["stages"].items() if not r["ok"]}
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert tuple(report["stages"]) == STAGES and report["ok"] and report["dry_run"]
    # The tool uses the current API: no warning of ours (e.g. a deprecated config key).
    ours = re.findall(r"titans_train/\S+:\d+: \w*Warning.*", proc.stderr)
    assert not ours, ours
    for name in STAGES:  # the summary table names every stage and its verdict
        assert f"{name}" in proc.stdout and "PASS" in proc.stdout
    stages = {name: r["details"] for name, r in report["stages"].items()}
    assert stages["environment"]["auto_backend"] == {"bfloat16": "sdpa", "float32": "sdpa"}
    kernel = {"triton", "eager_kernel_shape"}  # triton is in the dev extra: the interpreter
    assert set(stages["memory"]["backends"]) == {"eager", "compile"} | kernel
    model = stages["model"]["variants"]
    assert len(model) == 6 and model["lmm"]["attention_calls"]["sdpa"] == 0
    assert all(r["attention_calls"]["sdpa"] > 0 for k, r in model.items() if k != "lmm")
    assert math.isfinite(stages["trainer"]["zero2"]["eval"]["ppl@128"])
    assert all(r["tokens_per_second"] > 0 for r in stages["throughput"]["runs"].values())


def test_a_failing_stage_fails_the_run_and_the_others_still_run(tmp_path):
    """A stage that raises is recorded with its traceback; later stages run; the exit code is 1.
    Stage 1 raises here because its module is shadowed by one that fails on import."""
    fake = tmp_path / "shadow"
    fake.mkdir()
    (fake / "gpu_smoke_attention.py").write_text("raise RuntimeError('broken on purpose')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = (
        f"import sys; sys.argv = ['gpu_smoke.py']; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
        f"import gpu_smoke; sys.path.insert(0, {str(fake)!r}); "
        f"sys.exit(gpu_smoke.main(['--cpu-dry-run', '--stages', '1,0', '--out', "
        f"{str(tmp_path / 'out')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_smoke.json").read_text())
    assert list(report["stages"]) == ["environment", "flash_vs_fp64"]  # in stage order
    assert report["stages"]["environment"]["ok"] and not report["ok"]
    assert "broken on purpose" in report["stages"]["flash_vs_fp64"]["error"]
    assert "Traceback" in report["stages"]["flash_vs_fp64"]["error"] and "FAIL" in proc.stdout


def test_the_trainer_check_names_what_went_wrong(tmp_path):
    """check_run reads metrics.jsonl: a missing step, a NaN that was not injected, an injected
    NaN whose update was not skipped."""
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_smoke import check_run

    def write(rows):
        lines = [json.dumps(dict(step=s, loss=loss, skipped_steps=k)) for s, loss, k in rows]
        (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    nan = float("nan")
    write([(1, 5.0, 0), (2, 4.0, 0), (3, nan, 1), (4, 3.9, 1)])
    assert check_run(tmp_path, 1, 4, nan=3) == []
    write([(1, 5.0, 0), (3, nan, 1), (4, nan, 1)])
    assert check_run(tmp_path, 1, 4, nan=3) == [
        "step 2 not in metrics.jsonl",
        "step 4: loss nan",
    ]
    write([(1, 5.0, 0), (2, 4.0, 0), (3, nan, 0), (4, 3.9, 0)])
    assert check_run(tmp_path, 1, 4, nan=3) == [
        "skipped_steps at step 4 is not 1: the NaN step was not skipped"
    ]
    write([(1, 5.0, 0), (2, 4.0, 0), (3, 4.1, 1), (4, 3.9, 1)])  # the injection did not happen
    assert check_run(tmp_path, 1, 4, nan=3) == ["step 3: loss 4.1"]
    write([(5, 3.8, 1), (6, 3.7, 1)])  # the resumed part: no injection
    assert check_run(tmp_path, 5, 6, nan=None) == []
