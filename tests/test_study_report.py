"""benchmarks/study.py's incremental, resumable study.json and benchmarks/study_report.py's page
and plots, on small synthetic studies (no training: the per-model work is a stub)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402
import study_report  # noqa: E402


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
    # the study above has no --mix, --interleave: recorded before them, it read shuffled by 8
    assert study.resume(_fresh(mix="stratified", interleave="16"), path)["models"] == {}
    assert list(study.resume(_fresh(mix="shuffled", interleave="8"), path)["models"]) == ["mac"]


def test_the_same_study_under_another_spelling_of_its_paths_resumes(tmp_path):
    """--out typed relative then absolute, or --docs given only once, is the same study: its
    models are reused (they were not: the args were compared as typed)."""
    path = tmp_path / "study.json"
    first = _fresh(out="runs/study_v2", docs="None")
    study.run_models(["mac"], first, path, lambda n: {"val_loss": 1.0})
    again = _fresh(out=str(tmp_path.resolve()), docs="docs")
    assert list(study.resume(again, path)["models"]) == ["mac"]


def test_memtok_uses_16_memory_tokens_at_our_size():
    """The paper's N_l = 256 serves segments of 512; ours are 16 (study.py's MEMTOK)."""
    for name in ("mac-memtok", "mac-input-memtok"):
        _, extra = study.ALL[name]
        assert extra["mac_retrieval"] == "memory_tokens" and extra["num_memory_tokens"] == 16


# --- study_report.py ---------------------------------------------------------------------------


def _cell(acc: float) -> dict:
    return {"accuracy": acc, "token_accuracy": min(1.0, acc + 0.2)}


def _synthetic() -> dict:
    """A study.json as study.py writes it: two models, far at L..8L, near at L."""
    lengths = ("128", "256", "512", "1024")

    def model(acc: float, ppl: float) -> dict:
        far = {
            s: {n: _cell(acc / (i + 1)) for i, n in enumerate(lengths)} for s in ("passkey", "mqar")
        }
        far["ppl"] = {n: {"ppl": ppl + i} for i, n in enumerate(lengths)}
        near = {s: {"128": _cell(acc)} for s in ("passkey", "mqar")}
        return {
            "ffn_hidden": 192, "params": 209272, "train_seconds": 300.0, "eval_seconds": 60.0,
            "seconds": 360.0, "val_loss": 1.1, "loss_steps": [10, 20], "loss": [3.0, 2.0],
            "far": far, "near": near,
        }  # fmt: skip

    args = {
        "out": "runs/study_v2", "docs": "docs", "steps": "1200", "seq_len": "128", "lr": "0.003",
        "memory_max_lr": "0.1", "memory_forget_bias": "-8.0", "recall_share": "0.9",
        "document_masking": "on", "answer_loss": "True", "mqar_share": "0.2", "seed": "0",
        "set": "[]", "procs": "2", "samples": "32", "ppl_tokens": "8192",
        "eval_lengths": "1,2,4,8", "variants": "mac-memtok,transformer",
    }  # fmt: skip
    return {
        "command": "python benchmarks/study.py --out runs/study_v2 --steps 1200 --answer-loss",
        "args": args, "model": dict(study_report.OLD_MODEL, dim=48), "seconds": 720.0,
        "variants": {
            "mac-memtok": {"variant": "mac", "overrides": study.MEMTOK},
            "transformer": {"variant": "transformer", "overrides": {}},
        },
        "models": {"mac-memtok": model(1.0, 30.0), "transformer": model(0.0, 60.0)},
    }  # fmt: skip


def test_table_has_every_model_length_and_the_minutes():
    text = study_report.table(_synthetic())
    assert (
        "| ppl 128 (L) | ppl 256 (2L) | ppl 512 (4L) | ppl 1024 (8L) | train min | eval min |"
        in text
    )
    assert (
        "| MAC, memory tokens | 209,272 | 192 | 1.100 | 30.00 | 31.00 | 32.00 | 33.00 | 5.0 | 1.0 |"
        in text
    )
    assert "| MAC, memory tokens | 100 (100) | 100 (100) | 50 (70) | 33 (53) | 25 (45) |" in text
    assert "| Transformer++ (SWA) | 0 (20) |" in text and "**mqar**" in text


def test_setup_comes_from_what_the_study_recorded():
    text = " ".join(study_report.setup(_synthetic()).split())
    assert "width 48" in text  # the recorded model, not a constant
    assert "1200 steps × 16 sequences × 128 tokens" in text and "2.5 M tokens" in text
    assert "the loss on the answers only" in text and "memory forget bias -8.0" in text
    assert "at L, 2L, 4L, 8L" in text and "perplexity on 8192" in text
    assert "`num_memory_tokens=16`" in text  # the variant's deviation, named


def test_setup_names_a_burn_in_and_the_starting_weights():
    report = _synthetic()
    assert "Burn-in" not in study_report.setup(report)
    report["args"].update(burn_in="3", far_needles="0.5", fresh_share="0.0")
    report["args"]["init_from"] = "runs/phase1"
    text = " ".join(study_report.setup(report).split())
    assert "Burn-in 3 (`train.burn_in`): rows of 512 tokens whose first 384 run" in text
    assert "far needles 0.5" in text
    assert "started from the weights of its run in runs/phase1" in text


def test_page_plots_and_copy_are_written_and_the_notes_kept(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    notes = (
        f"{study_report.NOTES}\n\nWritten by hand: keep me.\n\n## An earlier study\n\nAlso kept.\n"
    )
    (docs / "results.md").write_text("# old page\n\nold table\n\n" + notes)
    report = _synthetic()
    page = study_report.write_report(report, docs, source="runs/study_v2/study.json")
    text = page.read_text()
    assert text.endswith(notes) and "old table" not in text
    assert f"Made by `{report['command']}` in 12 minutes" in text
    assert "python benchmarks/study_report.py docs/results.json --out docs" in text
    assert json.loads((docs / "results.json").read_text()) == report
    for png in ("study_loss.png", "study_recall.png", "study_ppl.png"):
        assert (docs / png).stat().st_size > 1000 and f"]({png})" in text


def test_every_study_variant_has_a_name():
    assert set(study.ALL) <= set(study_report.NAMES)
