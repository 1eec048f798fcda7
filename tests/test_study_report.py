"""benchmarks/study.py's incremental, resumable study.json and benchmarks/study_report.py's page
and plots, on small synthetic studies (no training: the per-model work is a stub)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402


def _args(**extra) -> dict:
    return {"steps": "1200", "seq_len": "128", "variants": "mac,mag", **extra}


def _fresh(**extra) -> dict:
    return {"args": _args(**extra), "variants": {}, "models": {}, "seconds": 0.0}


def test_study_json_is_written_after_each_model(tmp_path):
    """A study stopped in its second model keeps the first in study.json."""
    path = tmp_path / "study.json"

    def one(name: str) -> dict:
        if name == "mag":
            raise KeyboardInterrupt  # stopped while training the second model
        return {"val_loss": 1.0}

    with pytest.raises(KeyboardInterrupt):
        study.run_models(["mac", "mag"], _fresh(), path, one)
    saved = json.loads(path.read_text())
    assert list(saved["models"]) == ["mac"]
    assert saved["models"]["mac"]["val_loss"] == 1.0
    assert saved["models"]["mac"]["seconds"] >= 0 and saved["seconds"] >= 0
    assert not path.with_suffix(".json.tmp").exists()


def test_a_rerun_skips_the_models_already_done(tmp_path):
    path = tmp_path / "study.json"
    study.run_models(["mac"], _fresh(), path, lambda n: {"val_loss": 1.0})
    done = []

    def one(name: str) -> dict:
        done.append(name)
        return {"val_loss": 2.0}

    report = study.resume(_fresh(), path)
    study.run_models(["mac", "mag"], report, path, one)
    saved = json.loads(path.read_text())
    assert done == ["mag"]
    assert {k: m["val_loss"] for k, m in saved["models"].items()} == {"mac": 1.0, "mag": 2.0}


def test_a_study_with_other_settings_starts_afresh(tmp_path):
    path = tmp_path / "study.json"
    study.run_models(["mac"], _fresh(), path, lambda n: {"val_loss": 1.0})
    report = study.resume(_fresh(steps="600"), path)
    assert report["models"] == {}
    # ...while another --variants list is the same study, extended
    assert list(study.resume(_fresh(variants="mag"), path)["models"]) == ["mac"]


def test_memtok_uses_16_memory_tokens_at_our_size():
    """The paper's N_l = 256 serves segments of 512; ours are 16 (study.py's MEMTOK)."""
    for name in ("mac-memtok", "mac-input-memtok"):
        _, extra = study.ALL[name]
        assert extra["mac_retrieval"] == "memory_tokens" and extra["num_memory_tokens"] == 16
