"""benchmarks/bench_small.py --smoke: every small model takes a training step in its own
subprocess and the JSON report carries s/step, tokens/s and ATen ops per step (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_small.py"


@pytest.mark.slow
def test_smoke_reports_every_model(tmp_path):
    out = tmp_path / "small.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["setup"]["batch"] == 2 and report["setup"]["threads"] == 1
    results = report["results"]
    assert set(results) == {"ours-mac", "ours-mag", "ours-mal", "ours-lmm", "ours-transformer"}
    for impl, res in results.items():
        assert "error" not in res, (impl, res)
        assert res["s_per_step"] > 0 and res["tokens_per_s"] > 0 and res["params"] > 0
        assert res["ops_per_step"] > 100, impl
    # The memory variants dispatch many more ops than the attention-only baseline.
    assert results["ours-lmm"]["ops_per_step"] > 2 * results["ours-transformer"]["ops_per_step"]


def test_bad_model_name_is_an_error_row(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--models", "ours-nope"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error" in json.loads(proc.stdout)["results"]["ours-nope"]
