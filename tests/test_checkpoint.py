"""Commit protocol logic: completeness, auto-resume choice, corrupt `latest`, retention, diffs."""

import json

import pytest

from titans_train import checkpoint as ckpt


def fake_checkpoint(root, step, complete=True, payload=b"x" * 100):
    path = ckpt.step_dir(root, step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    (path / ckpt.STATE).write_text(json.dumps({"step": step}))
    if complete:
        files = {p.name: p.stat().st_size for p in path.iterdir()}
        (path / ckpt.MARKER).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_newest_complete_wins_and_incomplete_ones_are_named(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)
    with pytest.warns(UserWarning, match="step_00000030.*no COMPLETE"):
        assert ckpt.find_latest(tmp_path).name == "step_00000020"


def test_truncated_file_is_skipped(tmp_path):
    fake_checkpoint(tmp_path, 10)
    p = fake_checkpoint(tmp_path, 20)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x" * 40)
    with pytest.warns(UserWarning, match="truncated file mp_rank_00_model_states.pt"):
        assert ckpt.find_latest(tmp_path).name == "step_00000010"


def test_corrupt_latest_does_not_stop_resume(tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "latest").write_bytes(b"\x00\xffgarbage")
    with pytest.warns(UserWarning, match="latest"):
        assert ckpt.find_latest(tmp_path).name == "step_00000010"


def test_resolve_resume_modes(tmp_path):
    assert ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    p = fake_checkpoint(tmp_path, 5)
    assert ckpt.resolve_resume(str(p), tmp_path) == p
    (tmp_path / "latest").write_text("step_00000005\n")
    assert ckpt.resolve_resume(str(tmp_path / "latest"), tmp_path) == p
    bad = fake_checkpoint(tmp_path, 6, complete=False)
    with pytest.raises(ckpt.CheckpointError, match="step_00000006.*no COMPLETE"):
        ckpt.resolve_resume(str(bad), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "step_00000099"), tmp_path)


def test_one_resolver_for_tools_and_resume(tmp_path):
    """checkpoint.resume=PATH and --checkpoint accept the same things: a step directory, a
    ``latest`` file, a run directory or its checkpoints/ (newest complete), latest + run."""
    run = tmp_path / "run"
    old = fake_checkpoint(run / "checkpoints", 4)
    new = fake_checkpoint(run / "checkpoints", 8)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    for spec, want in [
        (new, new),
        (run / "checkpoints" / "latest", old),
        (run, new),
        (run / "checkpoints", new),
    ]:
        assert ckpt.resolve_checkpoint(spec) == want
        assert ckpt.resolve_resume(str(spec), run / "checkpoints") == want
    assert ckpt.resolve_checkpoint("latest", run) == new
    with pytest.raises(ckpt.CheckpointError, match="latest needs --run"):
        ckpt.resolve_checkpoint("latest")
    with pytest.raises(ckpt.CheckpointError, match=f"no complete checkpoint under {tmp_path}"):
        ckpt.resolve_checkpoint(tmp_path)


def test_latest_cannot_lead_outside_its_folder(tmp_path):
    """A ``latest`` file's content is untrusted: ``../`` names are refused, not followed."""
    outside = fake_checkpoint(tmp_path / "elsewhere", 1)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("../../elsewhere/step_00000001\n")
    assert outside.is_dir()
    with pytest.raises(ckpt.CheckpointError, match="latest: names '../../elsewhere.*not a step_"):
        ckpt.resolve_checkpoint(root / "latest")
    with pytest.raises(ckpt.CheckpointError, match="not a step_"):
        ckpt.resolve_resume(str(root / "latest"), root)


def test_retention_keeps_last_n_and_every_mth(tmp_path):
    for s in range(10, 110, 10):
        fake_checkpoint(tmp_path, s)
    fake_checkpoint(tmp_path, 5, complete=False)  # an old failed save: garbage
    removed = ckpt.apply_retention(tmp_path, keep_last=2, keep_every=50)
    left = sorted(s for s, _ in ckpt.list_checkpoints(tmp_path))
    assert left == [50, 90, 100]
    assert len(removed) == 8


def test_write_atomic_replaces(tmp_path):
    from titans_train.fsutil import write_text_atomically

    f = tmp_path / "latest"
    write_text_atomically(str(f), "a\n")
    write_text_atomically(str(f), "b\n")
    assert f.read_text() == "b\n" and not list(tmp_path.glob(".*tmp"))


def test_config_diff_separates_protected_keys():
    saved = {"model": {"dim": 64}, "train": {"seq_len": 256, "max_steps": 10}, "optim": {"lr": 1}}
    now = {"model": {"dim": 32}, "train": {"seq_len": 256, "max_steps": 20}, "optim": {"lr": 2}}
    protected, other = ckpt.config_diff(saved, now)
    assert protected == ["model.dim: 64 -> 32"]
    assert other == ["optim.lr: 1 -> 2", "train.max_steps: 10 -> 20"]


def test_rng_state_round_trip():
    import random

    import torch

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_run_dir_names_the_layout_checkpoint_py_writes(tmp_path):
    """RunDir is the one place the run-directory layout is spelled; the commit protocol follows it
    (a step directory, ``latest`` beside it) and a step directory knows its run."""
    from titans_train.run_dir import RunDir

    run = RunDir(tmp_path / "r")
    assert [p.relative_to(run.path).as_posix() for p in (run.config, run.metrics, run.wandb)] == [
        "config.yaml",
        "metrics.jsonl",
        "wandb",
    ]
    path = fake_checkpoint(run.checkpoints, 7)
    assert path == run.step_dir(7) == ckpt.step_dir(run.checkpoints, 7)
    assert RunDir.of_checkpoint(path) == run
    (run.latest).write_text(path.name + "\n")
    assert ckpt.follow_latest(run.latest) == path
    assert ckpt.resolve_checkpoint(run.path) == path
