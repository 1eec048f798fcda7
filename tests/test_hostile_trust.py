"""Security and integrity against hostile inputs (issue 11, items 1-8): checkpoints and manifests
that try to run code, secrets in config values, file modes, damage that keeps a file's size,
two runs in one directory, lost COMPLETE markers, and non-finite settings and parameters.

Training runs are tiny (1 process, a few steps). What a process does to another (the run lock,
a preemption stop) and the private run's file modes and W&B files use real `titans-train`
subprocesses; the checkpoint checks run train.main inside pytest (trainer_helpers.train_here)."""

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed import ROOT
from trainer_helpers import EXPERIMENT, base_overrides, losses, train, train_here
from wandb_helpers import clean_env, wandb_home

from titans_train import checkpoint as ckpt
from titans_train import run_lock
from titans_train.config import ConfigError
from titans_train.config_load import load_config
from titans_train.data import ShardManifest
from titans_train.data.errors import DataError
from titans_train.data.manifest import ShardInfo
from titans_train.tracking import REDACTED, scrub_secrets


# -- helpers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(data, run_dir, steps, *overrides, env=None, popen=False, timeout=300):
    """`python -m titans_train.cli` as one process (no torchrun: its pid is the trainer's)."""
    full = clean_env(WANDB_MODE="offline", **wandb_home(Path(run_dir).parent / "wandb-home"))
    full.update(
        PYTHONPATH=str(ROOT),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MASTER_PORT=str(free_port()),
        **(env or {}),
    )
    cmd = [sys.executable, "-m", "titans_train.cli", "--config", str(EXPERIMENT)]
    cmd += base_overrides(data, run_dir, steps) + ["train.global_batch=2", *overrides]
    if popen:  # output to a file: a full pipe would block the process
        log = open(Path(run_dir).parent / "popen.log", "w")  # noqa: SIM115 (closed by the OS)
        return subprocess.Popen(cmd, env=full, stdout=log, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)


def here(data, run_dir, steps, *overrides):
    """The run cli() makes, inside this process (trainer_helpers.train_here)."""
    return train_here(data, run_dir, steps, "train.global_batch=2", *overrides)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


class Evil:
    """A pickle that runs a shell command when unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_bytes(marker: Path, wrap=lambda x: {"torch": x}) -> bytes:
    buf = io.BytesIO()
    torch.save(wrap(Evil(marker)), buf)
    return buf.getvalue()


def recommit(path: Path) -> None:
    """Rewrite COMPLETE to match the files as they are now (what an attacker would do)."""
    marker = json.loads((path / ckpt.MARKER).read_text())
    for name in marker["files"]:
        marker["files"][name] = (path / name).stat().st_size
        if "digests" in marker:
            marker["digests"][name] = ckpt.file_digest(path / name, marker["checksum"])
    (path / ckpt.MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def finished(demo_shards, tmp_path_factory):
    """4 steps of ZeRO-2 with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    ok(here(demo_shards, run, 4, "checkpoint.interval=2", "checkpoint.keep_last=5"))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb*", ".lock"))
    (dst / "metrics.jsonl").unlink()
    return dst


def step_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


# -- 1. code execution from trainer_state.json and checkpoint files ------------------------------
@pytest.mark.slow
def test_crafted_rng_blob_does_not_run_on_resume(demo_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    newest, marker = step_path(run, 4), tmp_path / "PWNED"
    state = json.loads((newest / ckpt.STATE).read_text())
    blob = base64.b64encode(evil_bytes(marker)).decode()
    state["rng"][0] = {"format": "torch.save+base64", "data": blob}
    (newest / ckpt.STATE).write_text(json.dumps(state))
    recommit(newest)
    proc = here(demo_shards, run, 6)
    assert proc.returncode != 0
    assert not marker.exists()
    assert f"{newest / ckpt.STATE}: rng[0]: not a plain RNG pickle" in proc.stderr
    assert "checkpoint.force=true to resume without restoring RNG states" in proc.stderr
    # Forced: resumes, without the RNG states, and still runs nothing.
    proc = ok(here(demo_shards, run, 6, "checkpoint.force=true"))
    assert not marker.exists()
    assert "checkpoint.force: RNG states not restored" in proc.stderr
    assert "resumed from" in proc.stderr and sorted(losses(run)) == [5, 6]


def test_rng_states_are_plain_json_and_legacy_blobs_still_restore():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))  # survives JSON as it is
    assert state["format"] == "plain-v2"
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    assert (torch.rand(3), np.random.rand(), random.random())[1:] == a[1:]
    # A checkpoint written before the change: a torch.save pickle of the same states.
    buf = io.BytesIO()
    legacy = {
        "torch": torch.get_rng_state(),
        "cuda": None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    torch.save(legacy, buf)
    b = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state({"format": "torch.save+base64", "data": base64.b64encode(buf.getvalue())})
    c = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(b[0], c[0]) and b[1:] == c[1:]


def test_crafted_rng_blob_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "PWNED"
    blob = base64.b64encode(evil_bytes(marker)).decode()
    with pytest.raises(ckpt.CheckpointError, match="x/trainer_state.json: RNG state cannot"):
        ckpt.set_rng_state({"format": "torch.save+base64", "data": blob}, "x/trainer_state.json")
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "optim_states.pt"])
def test_export_and_eval_load_weights_only(finished, tmp_path, victim):
    """ZeRO-2 (DeepSpeed's zero_to_fp32 reads the optimizer files) and stage 0's model file."""
    from titans_train.load import open_checkpoint

    run = copy_run(finished, tmp_path / "run")
    path, marker = step_path(run, 4), tmp_path / "PWNED"
    target = next(path.glob(f"*{victim}"))
    target.write_bytes(evil_bytes(marker, wrap=lambda x: {"module": x, "optimizer": x}))
    if victim.startswith("mp_rank"):  # stage 0 reads this file itself
        state = json.loads((path / ckpt.STATE).read_text())
        state["config"]["zero"]["stage"] = 0
        (path / ckpt.STATE).write_text(json.dumps(state))
    recommit(path)
    with pytest.raises(ckpt.CheckpointError, match=f"cannot read the ZeRO-. weights of {path}"):
        open_checkpoint(path).model()
    assert not marker.exists()


# -- 2. shell injection through pipe: manifests --------------------------------------------------
HOSTILE = ["a.tar; touch pwned", "../x.tar", "$(id).tar", "`id`.tar", "a\nb.tar", "sub/a.tar"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_shard_names_are_refused(demo_shards, tmp_path, name):
    data = json.loads((demo_shards / "manifest.json").read_text())
    data["splits"]["train"]["shards"][0]["name"] = name.replace("pwned", str(tmp_path / "pwned"))
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    location = f"pipe:cat {tmp_path}/manifest.json"
    with pytest.raises(DataError) as info:
        ShardManifest.load(location)
    assert f"manifest {location}: shard name {data['splits']['train']['shards'][0]['name']!r}"
    assert "is not a plain file name" in str(info.value) and location in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_pipe_urls_quote_the_shard_name():
    m = ShardManifest("pipe:curl -s https://h/d/manifest.json", {})
    url = m.url(ShardInfo("a b;c.tar", 1, 1, ""))
    assert url == "pipe:curl -s https://h/d/'a b;c.tar'"
    assert ShardManifest("/d/manifest.json", {}).url(ShardInfo("x.tar", 1, 1, "")) == "/d/x.tar"


# -- 3. secrets in config values -----------------------------------------------------------------
SECRET = "s3cr3t-VALUE-42"


@pytest.fixture(scope="module")
def private_run_with_a_secret(demo_shards, tmp_path_factory):
    """A private run (checkpoint.private=true) whose data URL holds a secret, and its resume:
    one pair of launches for items 3 and 4."""
    source = f"pipe:cat {demo_shards}/manifest.json # auth={SECRET}"
    run = tmp_path_factory.mktemp("private") / "run"
    args = (f"data.train=['{source}']", "checkpoint.interval=2", "checkpoint.private=true")
    first = ok(cli(demo_shards, run, 2, *args))
    second = ok(cli(demo_shards, run, 3, *args))
    return run, first, second


@pytest.mark.slow
def test_secret_in_a_data_url_is_never_written(private_run_with_a_secret):
    run, first, second = private_run_with_a_secret
    assert "resumed from" in second.stderr  # the redacted stored config matches the live one
    for proc in (first, second):
        assert SECRET not in proc.stdout + proc.stderr  # the resolved-config dump, the log
        assert f"auth={REDACTED}" in proc.stderr
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written)
    assert any(p.name == ckpt.STATE for p in written)
    assert any(p.suffix == ".wandb" for p in written)  # W&B's config and recorded argv
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p


def test_one_redaction_rule_for_strings():
    env = {"HF_TOKEN": "hf_abcdefghijkl"}
    cfg = {
        "a": "pipe:curl -H 'Authorization: Bearer abc.def' https://h/m.json",
        "b": "https://user:pw123@host/x?X-Amz-Signature=deadbeef&part=1",
        "c": "pipe:aws s3 cp s3://b/m.json - --token=tok123",
        "d": "uses hf_abcdefghijkl inside",
        "e": "tokenizer=bytes eos_token=1 max_tokens=5",
    }
    got = scrub_secrets(cfg, env)
    assert "abc.def" not in got["a"] and got["a"].startswith("pipe:curl -H 'Authorization: ")
    assert got["b"] == f"https://user:{REDACTED}@host/x?X-Amz-Signature={REDACTED}&part=1"
    assert got["c"] == f"pipe:aws s3 cp s3://b/m.json - --token={REDACTED}"
    assert got["d"] == REDACTED
    assert got["e"] == cfg["e"]


# -- 4. private run directories ------------------------------------------------------------------
@pytest.mark.slow
def test_private_run_dir_is_owner_only(private_run_with_a_secret):
    run = private_run_with_a_secret[0]  # written by a start and a resume
    paths = [run, *run.rglob("*")]
    assert len(paths) > 8 and stat.S_IMODE(run.stat().st_mode) == 0o700
    loose = [f"{p} {oct(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o077]
    assert not loose


# -- 5. checksums ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_damage_that_keeps_the_size_is_skipped_naming_the_file(demo_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    newest = step_path(run, 4)
    victim = next(newest.glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[:64])
    victim.write_bytes(bytes(data))
    proc = ok(here(demo_shards, run, 5))
    assert (
        f"skipping incomplete checkpoint {newest}: checksum mismatch in file {victim.name}"
        in proc.stderr
    )
    assert f"resumed from {step_path(run, 2)} at step 2" in proc.stderr


def test_checkpoints_without_checksums_still_resume_with_a_note(tmp_path):
    path = ckpt.step_dir(tmp_path, 3)
    path.mkdir()
    (path / ckpt.STATE).write_text("{}")
    (path / ckpt.MARKER).write_text(json.dumps({"step": 3, "files": {ckpt.STATE: 2}}))
    with pytest.warns(UserWarning, match="no checksums recorded.*sizes checked only"):
        assert ckpt.find_latest(tmp_path) == path


# -- 6. run-directory lock ----------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_in_a_locked_dir_is_refused_and_a_dead_holder_is_taken_over(
    demo_shards, tmp_path
):
    run = tmp_path / "run"
    holder = cli(demo_shards, run, 5, "debug.hang_at_step=2", popen=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # until the first run holds the lock and trained step 1
            if logged_a_step(run):
                break
            assert holder.poll() is None, (tmp_path / "popen.log").read_text()[-3000:]
            time.sleep(0.5)
        proc = here(demo_shards, run, 3)  # this process: the lock is another's
        assert proc.returncode == 1
        assert json.loads((run / run_lock.LOCK_NAME).read_text())["pid"] == holder.pid
        assert (
            f"run directory {run} is locked by host {socket.gethostname()} pid {holder.pid}"
            in proc.stderr
        )
        assert "another run is using it" in proc.stderr
        rows = (run / "metrics.jsonl").read_text().splitlines()
        assert len([r for r in rows if '"header"' not in r]) == 1  # the holder's step 1
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the record stays behind
        holder.communicate()
    proc = ok(here(demo_shards, run, 3))
    assert f"pid {holder.pid}" in proc.stderr and "that process is no longer running" in proc.stderr
    assert json.loads((run / run_lock.LOCK_NAME).read_text())["released"] is True


@pytest.mark.slow
def test_lock_is_released_by_a_preemption_stop_and_the_requeue_takes_it(demo_shards, tmp_path):
    run = tmp_path / "run"
    first = cli(demo_shards, run, 200, "checkpoint.interval=100", popen=True)
    deadline = time.time() + 240
    while not logged_a_step(run) and time.time() < deadline:  # the header comes before step 1
        assert first.poll() is None, (tmp_path / "popen.log").read_text()[-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=240) == 85, (tmp_path / "popen.log").read_text()[-3000:]
    record = json.loads((run / run_lock.LOCK_NAME).read_text())
    assert record["pid"] == first.pid and record["released"] is True
    stopped = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    # The requeued job, with one step left (the stop's step depends on the machine's speed).
    proc = ok(here(demo_shards, run, stopped + 1, "checkpoint.interval=100"))
    assert "resumed from" in proc.stderr and "taking over" not in proc.stderr


def logged_a_step(run: Path) -> bool:
    path = run / "metrics.jsonl"
    return path.exists() and '"step"' in path.read_text()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_record(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": dead_pid(), "job": None, "started": "t"}
    (run / run_lock.LOCK_NAME).write_text(json.dumps(dict(record, released=False, **fields)))


def test_lock_held_in_this_process_refuses_a_second_taker(tmp_path):
    first = run_lock.acquire(tmp_path)
    try:
        with pytest.raises(run_lock.RunLockError, match=f"pid {os.getpid()}.*another run"):
            run_lock.acquire(tmp_path)
    finally:
        first.release()
    again = run_lock.acquire(tmp_path)  # released: free, no note
    assert again.notes == []
    again.release()


def test_stale_lock_from_another_host_needs_break_lock(tmp_path, monkeypatch):
    write_record(tmp_path, host="node-elsewhere", pid=4242)
    with pytest.raises(run_lock.RunLockError) as info:
        run_lock.acquire(tmp_path)
    assert "locked by host node-elsewhere pid 4242" in str(info.value)
    assert "checkpoint.break_lock=true" in str(info.value)
    lock = run_lock.acquire(tmp_path, break_lock=True)
    assert "break_lock: taking over the lock of host node-elsewhere pid 4242" in lock.notes[0]
    lock.release()
    # A requeue of the same SLURM job on another node takes over without the flag.
    write_record(tmp_path, host="node-elsewhere", pid=4242, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = run_lock.acquire(tmp_path)
    assert "an earlier attempt of this job" in lock.notes[0]
    lock.release()


# -- 7. auto-resume with no complete checkpoint --------------------------------------------------
@pytest.mark.slow
def test_auto_resume_refuses_when_no_checkpoint_is_complete(demo_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    for step in (2, 4):
        (step_path(run, step) / ckpt.MARKER).unlink()
    proc = here(demo_shards, run, 4)
    assert proc.returncode != 0
    assert f"{run / 'checkpoints'} holds 2 step directories but none is complete" in proc.stderr
    assert "checkpoint.resume=never to start over" in proc.stderr
    assert step_path(run, 2).is_dir() and step_path(run, 4).is_dir()  # nothing deleted
    assert not (run / "metrics.jsonl").exists()  # nothing trained
    proc = ok(here(demo_shards, run, 2, "checkpoint.resume=never"))
    (aside,) = (run / "checkpoints").glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert ckpt.incomplete_reason(step_path(run, 2)) is None  # the new run's own checkpoint


# -- 8. non-finite settings and parameters -------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.grad_clip=-inf", "optim.grad_clip"),
        ("data.weights=[1.0,nan]", "data.weights[1]"),
    ],
)
def test_non_finite_settings_name_the_key(demo_shards, override, key):
    extra = [f"data.train=[{demo_shards},{demo_shards}]"] if key.startswith("data") else []
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be a finite number"):
        load_config(EXPERIMENT, [f"data.train=[{demo_shards}]", *extra, override])


@pytest.mark.parametrize(
    "stage, nproc",
    [
        pytest.param(2, 1, marks=pytest.mark.slow),
        pytest.param(3, 2, marks=[pytest.mark.distributed, pytest.mark.slow]),
    ],
)
def test_non_finite_parameters_are_never_committed(demo_shards, tmp_path, stage, nproc):
    """optim.eps=0 is a valid setting, but Adam's first update of a parameter whose gradient is
    exactly zero (embedding rows of ids the data never uses) is 0/0 = NaN, while the loss and the
    gradient norm stay finite: nothing before the commit notices. ZeRO-3 on 2 ranks: each checks
    its own partition and an all-reduce agrees."""
    run = tmp_path / "run"
    args = ("optim.eps=0", "checkpoint.interval=1", f"zero.stage={stage}")
    if nproc == 1:
        proc = here(demo_shards, run, 3, *args)
    else:
        proc = train(demo_shards, run, 3, *args, nproc=nproc, check=False)
    assert proc.returncode != 0
    assert "step 1: parameters are not finite" in proc.stderr
    assert "refusing to commit a checkpoint" in proc.stderr
    assert not any(
        ckpt.incomplete_reason(p) is None for _, p in ckpt.list_checkpoints(run / "checkpoints")
    )


# -- 9. a tokenizer file named by an untrusted record stays in its folder -------------------------
@pytest.mark.parametrize("name", ["../secret.txt", "/ABS/secret.txt"])
def test_export_copies_no_file_a_hostile_config_names(tmp_path, capsys, name):
    """The tokenizer ``file`` an export's config.json or a manifest records is untrusted: a path
    out of its folder is refused before titans-export copies anything into the new export."""
    from titans_train import export
    from titans_train.models import ModelConfig, TitansLM
    from titans_train.pretrained import save_pretrained

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    name = name.replace("/ABS", str(tmp_path))
    identity = {"name": "x", "kind": "tokenizers", "sha256": "0" * 64, "vocab_size": 320}
    identity.update(eos_id=0, eos_token="</s>", file=name)
    cfg = ModelConfig(
        variant="mac", vocab_size=320, dim=32, depth=1, heads=2, window=16, segment_len=16,
        chunk_size=8, num_persistent=2,
    )  # fmt: skip
    src = tmp_path / "hostile"
    save_pretrained(TitansLM(cfg), src, {"tokenizer": identity})
    out = tmp_path / "out"
    assert export.main(["--checkpoint", str(src), "--out", str(out)]) == 2
    copied = [p for p in out.rglob("*") if p.is_file() and b"TOP SECRET" in p.read_bytes()]
    assert not copied
    assert f"tokenizer file {name!r} is not a plain file name" in capsys.readouterr().err
