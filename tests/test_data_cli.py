"""The titans-data CLIs end to end: help, demo corpus, verify, inspect, error exits."""

import os
import subprocess
import sys

import pytest
from data_helpers import REPO, build, subprocess_env, uniform_corpus

from data_pipelines import demo
from data_pipelines.cli import COMMANDS, main
from titans_train.data import StreamingLoader


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0 and f"titans-data {command}" in capsys.readouterr().out


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipelines.verify", "--help"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "re-hash every shard" in proc.stdout


@pytest.fixture
def shards(tmp_path):
    uniform_corpus(str(tmp_path / "c.jsonl"), 40)
    build(str(tmp_path / "out"), [str(tmp_path / "c.jsonl")], seq_len=31, samples_per_shard=8)
    return tmp_path / "out"


def test_verify_lists_every_problem(shards, capsys):
    assert main(["verify", str(shards), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    with open(shards / "train-000001.tar", "r+b") as f:
        f.seek(3000)  # same size, other bytes
        f.write(b"!")
    os.remove(shards / "train-000003.tar")
    assert main(["verify", str(shards), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAIL shard train-000001.tar" in out and "sha256 mismatch" in out
    assert "FAIL shard train-000003.tar" in out and "2 problem(s)" in out
    assert main(["verify", str(shards / "nothing"), "--no-progress"]) == 1


def test_inspect_decodes_samples(shards, capsys):
    assert main(["inspect", str(shards), "--samples", "3", "--chars", "5000"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer  bytes" in out and "train-000000-000002 doc_starts" in out
    assert "<|eos|>" in out  # documents here are 1-2 samples long


def test_tokenize_refuses_to_overwrite(shards, tmp_path, capsys):
    args = ["tokenize", str(tmp_path / "c.jsonl"), "--out", str(shards), "--no-progress"]
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already complete: nothing to do
    assert main([*args, "--overwrite", "--seq-len", "15"]) == 0


def test_demo_corpus(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--seq-len", "64", "--max-mb", "0.25", "--no-progress"]) == 0
    manifest = demo.build_demo(out, seq_len=64, max_mb=0.25, progress=False)  # reused as is
    assert manifest["totals"]["text_bytes"] >= 0.25 * 2**20 and manifest["seq_len"] == 64
    files = demo.stdlib_files(0.25)
    assert files == sorted(files, key=lambda p: os.path.relpath(p, os.path.dirname(files[0])))
    assert all("site-packages" not in f and f.endswith(".py") for f in files)
    loader = StreamingLoader(out, seq_len=64, vocab_size=257, global_batch=4, micro_batch=2)
    assert loader.next_step()[0].tokens.shape == (2, 65)
    rebuilt = demo.build_demo(out, seq_len=32, max_mb=0.25, progress=False)  # other settings
    assert rebuilt["seq_len"] == 32
