"""Test 6: SIGKILL the tokenize job mid-way; --resume then gives the uninterrupted result."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from data_helpers import build, subprocess_env, uniform_corpus

ARGS = dict(seq_len=31, samples_per_shard=8, val_fraction=0.1, chunk_docs=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    uniform_corpus(str(root / "c.jsonl"), 2000)  # ~170 chunks, ~250 shards
    build(str(root / "reference"), [str(root / "c.jsonl")], **ARGS)  # uninterrupted, 1 worker
    return root


def files(directory) -> dict[str, bytes]:
    """Every visible file of an output directory with its bytes."""
    return {
        name: (directory / name).read_bytes()
        for name in sorted(os.listdir(directory))
        if not name.startswith(".")
    }


def kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    """Start `cmd`, and SIGKILL its whole process group (workers too) once ready() holds."""
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"job ended before the kill: {proc.stderr.read()}"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["chunks", "shards"])
def test_kill_and_resume_gives_the_uninterrupted_result(corpus, tmp_path, phase):
    out = tmp_path / "out"
    pattern = (
        str(out / ".work" / "chunk-*.lengths.npy") if phase == "chunks" else str(out / "*.tar")
    )
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.tokenize",
        str(corpus / "c.jsonl"),
        "--out",
        str(out),
        "--seq-len",
        "31",
        "--samples-per-shard",
        "8",
        "--val-fraction",
        "0.1",
        "--chunk-docs",
        "8",
        "--workers",
        "2",
        "--no-progress",
    ]
    kill_when(cmd, lambda: len(glob.glob(pattern)) >= 5)

    reference = files(corpus / "reference")
    partial = files(out)
    assert "manifest.json" not in partial  # nothing claims the unfinished job
    assert len(partial) < len(reference) - 1
    for name, data in partial.items():  # every visible shard is complete
        assert data == reference[name], name
    with pytest.raises(FileExistsError, match="interrupted job"):
        build(str(out), [str(corpus / "c.jsonl")], **ARGS)

    build(str(out), [str(corpus / "c.jsonl")], resume=True, **ARGS)
    assert files(out) == reference  # byte-identical shards and manifest (and 2 workers = 1)
    assert os.listdir(out) == [n for n in os.listdir(out) if not n.startswith(".")]
