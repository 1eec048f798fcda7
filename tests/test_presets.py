"""Model presets: every YAML loads, and the paper sizes land within 10% of their names."""

import subprocess
import sys
from pathlib import Path

import pytest

from titans_train.config_load import load_model_config
from titans_train.describe import count_params, nominal_size

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "model").glob("*.yaml"))


def test_every_variant_has_every_paper_size():
    names = {p.stem for p in PRESETS}
    for variant in ("mac", "mag", "mal", "lmm", "transformer"):
        for size in ("170m", "340m", "760m", "1.3b"):
            assert f"{variant}_{size}" in names
    assert "tiny" in names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_size_within_10_percent(path):
    cfg = load_model_config(path)
    nominal = nominal_size(path)
    if nominal is None:
        assert path.stem == "tiny"
        return
    total = count_params(cfg)["total"]
    assert abs(total / nominal - 1) < 0.10, f"{path.name}: {total / 1e6:.1f}M"
    # Paper settings (titans_spec.md section 5).
    assert (cfg.chunk_size, cfg.segment_len, cfg.window, cfg.memory_depth) == (16, 512, 2048, 2)


def test_describe_cli_prints_params_and_flops():
    out = subprocess.run(
        [sys.executable, "-m", "titans_train.cli", "describe", "configs/model/mac_340m.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "parameters: 338.0M total" in out
    assert "nominal size 340M: -0.6%" in out
    assert "FLOPs per token at seq_len 4096" in out


def test_describe_cli_rejects_unknown_override():
    proc = subprocess.run(
        [sys.executable, "-m", "titans_train.cli", "describe", "configs/model/tiny.yaml", "dimm=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "dimm" in proc.stderr
