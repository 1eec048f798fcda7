"""The attention stages of the GPU smoke check, in their CPU dry-run mode."""

import importlib.util
from pathlib import Path

import pytest
import torch

from titans_train.testing.flash_contract import flash_attn_module

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke_attention.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke_attention", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flash_stage_dry_run(smoke):
    result = smoke.flash_stage(torch.device("cpu"), dry_run=True)
    assert result["ok"], result["failures"][:3]
    dims = {c["head_dim"] for c in result["cases"]}
    assert dims == {48, 64, 96, 128, 256}
    assert {(c["n_q"], c["n_k"]) for c in result["cases"]} >= {(1, 129), (9, 23), (16, 16)}
    assert {c["window_name"] for c in result["cases"]} == set(smoke.WINDOWS)


def test_flash_stage_catches_a_misaligned_flash(smoke):
    bad = flash_attn_module(top_left=True)
    result = smoke.flash_stage(torch.device("cpu"), dry_run=True, contract=bad)
    assert not result["ok"] and result["failures"]
    assert all(c["n_q"] != c["n_k"] for c in result["failures"])  # only unequal lengths differ


def test_attend_stage_dry_run(smoke):
    result = smoke.attend_stage(torch.device("cpu"), dry_run=True)
    assert result["ok"], result["failures"]
    assert {c["backend"] for c in result["cases"]} == {"flash", "flex"}
    assert all(c["grads_checked"] == (c["backend"] == "flash") for c in result["cases"])
    assert result["flex_graphs_over_6_mac_segments"] <= 1
    assert any("forward only" in n for n in result["notes"])
