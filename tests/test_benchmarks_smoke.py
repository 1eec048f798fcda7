"""Every entry script in benchmarks/ runs its ``--smoke`` mode here, so no benchmark rots unseen
(issue 12). The scripts are found by glob: a new benchmark fails this file until it has a
``--smoke`` mode that writes its output under ``--out`` and exits 0, or is exempt below with
its reason (and the exemption is checked too)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# What a smoke run writes, and the arguments that put it in the test's tmp dir ({tmp}).
DEFAULT = ("smoke.json", ["--out", "{tmp}/smoke.json"])
OUTPUTS = {
    "study.py": ("study.json", ["--out", "{tmp}"]),  # a run dir: data, checkpoint, evals, docs/
    "study_report.py": ("results.md", ["--out", "{tmp}"]),  # a docs dir: page and plots
}
# Modules other benchmarks import (no __main__): the importer's smoke run exercises them.
HELPERS = {"zero_held.py": "bench_trainer.py", "gpu_smoke_stages.py": "gpu_smoke.py"}
HELPERS["probe_trained.py"] = "probe_mac.py"  # its --checkpoint mode (tests/test_probe_mac.py)
HELPERS["probe_build.py"] = "probe_mac.py"  # the probes' models and experiments
HELPERS["study_data.py"] = "study.py"  # the study's corpus and recall shards
# Smoke runs another test already makes (not run twice): script -> (test file, flag it passes).
ELSEWHERE = {
    "gpu_smoke.py": ("tests/test_gpu_smoke.py", "--cpu-dry-run"),  # its --smoke is an alias
    "bench_small.py": ("tests/test_bench_small.py", "--smoke"),
    "probe_mac.py": ("tests/test_probe_mac.py", "--smoke"),
    "probe_length.py": ("tests/test_probe_length.py", "--smoke"),
    "probe_carry.py": ("tests/test_probe_carry.py", "--smoke"),
}
# Seconds per script: docs/benchmarks.md. Only the torchrun ones take over ~20 s on 2 idle cores.
TORCHRUN = {"bench_trainer.py", "study.py"}
SLOW = TORCHRUN


def entry_scripts() -> list:
    params = []
    for path in sorted(BENCH.glob("*.py")):
        if path.name in HELPERS or path.name in ELSEWHERE:
            continue
        marks = [pytest.mark.slow] if path.name in SLOW else []
        marks += [pytest.mark.distributed] if path.name in TORCHRUN else []
        params.append(pytest.param(path.name, id=path.stem, marks=marks))
    return params


def read_rows(path: Path) -> list[dict]:
    """A JSON document or JSON lines, as a list of objects."""
    text = path.read_text()
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("script", entry_scripts())
def test_smoke_runs_and_writes_its_output(script, tmp_path):
    name, args = OUTPUTS.get(script, DEFAULT)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(BENCH / script), "--smoke", *args]
    # cwd: the tmp dir, so a script that depends on being run from the repo root fails here
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    out = tmp_path / name
    assert out.is_file() and out.stat().st_size > 0, f"{script} --smoke wrote no {name}"
    if out.suffix == ".json":
        rows = read_rows(out)
        assert rows and not [r for r in rows if "error" in r], rows


def test_every_benchmark_is_run_or_exempt_for_a_reason_that_holds():
    names = {p.name for p in BENCH.glob("*.py")}
    assert set(HELPERS) | set(ELSEWHERE) | set(OUTPUTS) <= names, "a listed script is gone"
    for helper, importer in HELPERS.items():
        source = (BENCH / helper).read_text()
        assert "__main__" not in source, f"{helper} runs as a script now: give it --smoke"
        module = helper.removesuffix(".py")
        pattern = rf"^\s*(from {module} import|import {module}\b)"
        assert re.search(pattern, (BENCH / importer).read_text(), re.M), (helper, importer)
    for script, (test, flag) in ELSEWHERE.items():
        source = (ROOT / test).read_text()
        assert script in source and flag in source, f"{test} no longer runs {script} {flag}"
