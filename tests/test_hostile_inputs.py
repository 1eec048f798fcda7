"""Hostile and unlucky inputs (issue 11, items 9-14): each gets a clear one-line error naming the
file, key, override, shard or step, and nothing is left half-done."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import webdataset as wds
from data_helpers import build, shards_from_corpus
from distributed import ROOT
from trainer_helpers import EXPERIMENT, base_overrides, metrics, train_here
from wandb_helpers import clean_env, wandb_home

from data_pipelines.sources import InputError
from data_pipelines.tokenizer import load_tokenizer
from titans_train.config import ConfigError
from titans_train.config_load import load_config
from titans_train.data import DataError, StreamingLoader
from titans_train.data.shard_format import CRC_MEMBER


def run_trainer(data, run_dir, steps, *overrides, timeout=600) -> subprocess.CompletedProcess:
    """One single-process `titans-train` without a launcher (so the exit status is the
    trainer's own, not torchrun's)."""
    env = clean_env(WANDB_MODE="offline", **wandb_home(Path(run_dir) / "wandb-home"))
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "titans_train.cli", "--config", str(EXPERIMENT)]
    cmd += base_overrides(data, run_dir, steps) + list(overrides)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


# -- 9. disk full during a checkpoint save --------------------------------------------------------
@pytest.mark.slow
def test_disk_full_names_enospc_removes_the_partial_step_and_is_not_requeued(demo_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_trainer(demo_shards, run, 4, "checkpoint.interval=1", "debug.enospc_at_step=3")
    assert proc.returncode == 74, proc.stderr[-3000:]  # EX_IOERR, not 85 (requeue)
    err = proc.stderr
    line = next(x for x in err.splitlines() if "disk full" in x)
    assert "ENOSPC" in line and "step-3 checkpoint" in line and "step_00000003" in line, line
    assert "removed the partial step_00000003" in line
    assert "Traceback" not in err and "failed in step 4" not in err, err[-3000:]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000001", "step_00000002"]  # the partial step 3 is gone
    wandb_err = [x for x in err.splitlines() if "wandb" in x.lower() and "error" in x.lower()]
    assert not wandb_err, wandb_err  # the W&B run was finished, not left to crash at exit


def test_disk_full_is_told_from_other_save_failures(tmp_path):
    import errno

    from titans_train.train_state import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert disk_full(wrapped, tmp_path)
    assert not disk_full(OSError(errno.EIO, "Input/output error"), tmp_path)
    # torch's short write without an errno counts only when the disk is (nearly) full
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")
    assert not disk_full(torch_error, tmp_path)  # this disk has room


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MiB tmpfs (root only): room for one tiny checkpoint, not two."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], check=False)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_really_full_disk_is_named_too(demo_shards, small_tmpfs, tmp_path):
    """On a real full disk torch reports only `unexpected pos` / `file write failed`. The run is
    made in this process (trainer_helpers.train_here); the launched one is the test above."""
    run = small_tmpfs / "run"
    proc = train_here(
        demo_shards, run, 3, "checkpoint.interval=1", f"tracking.dir={tmp_path / 'wandb'}"
    )
    assert proc.returncode == 74, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "disk full" in x)
    assert "ENOSPC" in line and "step-2 checkpoint" in line and "removed the partial" in line
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]


# -- 10. metrics.jsonl is rewound on resume -------------------------------------------------------
@pytest.mark.slow
def test_metrics_are_rewound_on_resume_so_every_step_appears_once(demo_shards, tmp_path):
    """Steps 3-4 ran after the step-2 checkpoint; resuming from it trains them again, and the
    file keeps only the second attempt. (After real SIGKILLs: test_crash_consistency.py.) Both
    runs are made in this process (trainer_helpers.train_here)."""
    run = tmp_path / "run"
    run.mkdir()
    header = json.dumps({"header": {"attempt": 0}})
    (run / "metrics.jsonl").write_text(header + "\n")
    common = ("checkpoint.interval=2", "checkpoint.keep_last=5", "train.eval_interval=3")
    first = train_here(demo_shards, run, 4, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    before = metrics(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0')  # a torn last line, as a crash mid-write leaves it
    resumed = train_here(
        demo_shards, run, 4, *common, f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metrics(run, headers=True)
    assert rows[0] == {"header": {"attempt": 0}}
    train_steps = [r["step"] for r in rows if "loss" in r]
    val_steps = [r["step"] for r in rows if "val/loss" in r]
    assert train_steps == [1, 2, 3, 4] and val_steps == [3, 4], rows
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in before if "loss" in r]
    # rows 3, val 3, 4, val 4 and the torn line
    assert "metrics.jsonl: dropped 5 rows after step 2" in resumed.stderr


# -- 11. tokenize: text encodings, bad records, no leftovers -------------------------------------
def tokenize(tmp_path, *sources, **kwargs):
    return build(
        str(tmp_path / "out"),
        [str(s) for s in sources],
        seq_len=7,
        samples_per_shard=4,
        val_fraction=0,
        **kwargs,
    )


def test_latin1_text_is_refused_naming_file_and_line(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("first line\nna\u00efve caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt:2: not valid utf-8 \(byte 0xef"):
        tokenize(tmp_path, src)
    assert not (tmp_path / "out").exists()  # no empty OUT/.work left behind


def test_encoding_option_decodes_latin1(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("na\u00efve caf\u00e9 ".encode("latin-1") * 4)
    manifest = tokenize(tmp_path, src, encoding="latin-1")
    assert manifest["totals"]["replaced_characters"] == 0
    assert manifest["config"]["encoding"] == "latin-1"
    # the bytes tokenizer sees UTF-8: two bytes per accented letter
    assert manifest["totals"]["text_bytes"] == len(("na\u00efve caf\u00e9 " * 4).encode())


def test_errors_replace_counts_replacements_in_the_manifest(tmp_path, capsys):
    src = tmp_path / "mixed.txt"
    src.write_bytes(b"ok \xff\xfe text \xe9 " * 3)
    manifest = tokenize(tmp_path, src, errors="replace")
    assert manifest["totals"]["replaced_characters"] == 9  # 0xff, 0xfe, 0xe9 in each copy
    assert "9 undecodable byte sequences replaced with U+FFFD" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, why",
    [
        (b'{"text": "caf\xe9"}', r"bad\.jsonl:2: not valid utf-8"),
        (b'{"text": "unterminated', r"bad\.jsonl:2: not a JSON record"),
        (b'{"body": "no text"}', r"bad\.jsonl:2: no text field 'text'"),
        (b'["a", "list"]', r"bad\.jsonl:2: no text field 'text'"),
    ],
)
def test_bad_jsonl_line_names_file_and_line_and_leaves_nothing(tmp_path, line, why):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "good document"}\n' + line + b"\n")
    with pytest.raises(InputError, match=why):
        tokenize(tmp_path, src)
    assert not (tmp_path / "out").exists()


def test_failed_job_keeps_an_existing_out_dir_but_not_its_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README").write_text("mine")
    src = tmp_path / "bad.txt"
    src.write_bytes(b"\xff")
    with pytest.raises(ValueError):
        tokenize(tmp_path, src)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README"]


def test_tokenize_cli_prints_one_line(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"caf\xe9")
    cmd = [sys.executable, "-m", "data_pipelines", "tokenize", str(src), "--out"]
    cmd += [str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"titans-data tokenize: error: {src}:1: not valid utf-8 (byte 0xe9: unexpected end "
        "of data); pass --encoding (e.g. latin-1) or --errors replace"
    ]


# -- 12. raw tracebacks: YAML syntax, malformed overrides, corrupt tokenizer.json ----------------
def experiment(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = experiment(tmp_path, "name: x\ntrain: {seq_len: 4\nmodel: {}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3:\d+: YAML syntax error: did not find"):
        load_config(path)


def test_yaml_syntax_error_in_a_preset_names_the_preset(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "broken.yaml").write_text("dim: [64\n")
    path = experiment(tmp_path, "presets: {model: broken}\n")
    with pytest.raises(ConfigError, match=r"model/broken\.yaml:2:\d+: YAML syntax error"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps 10", "override 'train.max_steps 10': overrides are key=value"),
        ("=3", "override '=3': overrides are key=value"),
        ("train.max_steps=[1", "override 'train.max_steps=[1': YAML syntax error"),
        ("train.max_steps=abc", "override 'train.max_steps=abc': Value 'abc' of type 'str'"),
        ("train.nope=1", "override 'train.nope=1': Key 'nope' not in 'TrainConfig'"),
    ],
)
def test_malformed_override_is_named(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(EXPERIMENT, [override])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_trainer_cli_malformed_override_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "titans_train.cli", "--config", str(EXPERIMENT)]
    proc = subprocess.run(
        cmd + ["train.max_steps", "10"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "config error: override 'train.max_steps': overrides are key=value "
        "(e.g. train.max_steps=10)"
    ]


def test_corrupt_tokenizer_json_names_the_path(tmp_path):
    bad = tmp_path / "tokenizer.json"
    for text in ('{"version": "1.0", "model": {"type": "BPE", "vo', "not json at all"):
        bad.write_text(text)
        with pytest.raises(ValueError, match=rf"^tokenizer {bad}: not a valid tokenizer\.json"):
            load_tokenizer(str(bad))


def test_describe_bad_path_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "titans_train.cli", "describe", str(tmp_path / "nope.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"titans-train describe: error: model config not found: {tmp_path / 'nope.yaml'}"
    ]


# -- 13. validation gaps --------------------------------------------------------------------------
def test_negative_checkpoint_interval_is_refused(demo_shards):
    with pytest.raises(ConfigError, match=r"override 'checkpoint.interval=-1': checkpoint\.int"):
        load_config(EXPERIMENT, [f"data.train=[{demo_shards}]", "checkpoint.interval=-1"])


def test_seq_len_is_checked_before_segment_len(demo_shards):
    with pytest.raises(ConfigError, match=r"train\.seq_len: 0 must be >= 1"):
        load_config(EXPERIMENT, [f"data.train=[{demo_shards}]", "train.seq_len=0"])


def test_tracking_mode_is_checked_with_the_config(demo_shards):
    with pytest.raises(ConfigError, match=r"tracking\.mode: 'onlin' is not one of"):
        load_config(EXPERIMENT, [f"data.train=[{demo_shards}]", "tracking.mode=onlin"])


def test_window_on_mac_warns_only_when_set(demo_shards):
    data = f"data.train=[{demo_shards}]"
    with pytest.warns(UserWarning, match=r"model\.window=32 has no effect on MAC"):
        load_config(EXPERIMENT, [data, "train.seq_len=128", "model.window=32"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the preset's window (for the other variants) is fine
        load_config(EXPERIMENT, [data, "train.seq_len=128"])
        load_config(EXPERIMENT, [data, "train.seq_len=128", "model.variant=mag"])


def test_key_from_the_command_line_is_blamed_on_the_override_not_the_file(demo_shards, tmp_path):
    data = f"data.train=[{demo_shards}]"
    with pytest.raises(ConfigError, match=r"^override 'optim.schedule=cosin': optim\.schedule"):
        load_config(EXPERIMENT, [data, "optim.schedule=cosin"])
    tiny = ROOT / "configs" / "model" / "tiny.yaml"
    path = experiment(
        tmp_path,
        f"presets: {{model: {tiny}}}\ndata: {{train: [{demo_shards}]}}\n"
        "optim: {schedule: cosin}\nmodel: {vocab_size: 320}\ntrain: {seq_len: 128}\n",
    )
    with pytest.raises(ConfigError, match=rf"^{path}: optim\.schedule"):
        load_config(path)


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", "data error: shard train-000001.tar listed in"),
        (
            "seq_len",
            "data error: manifest {m}: samples hold seq_len 128 (+1) tokens but the model "
            "expects seq_len 64",
        ),
        (
            "vocab",
            "data error: manifest {m}: tokenizer vocab_size 257 exceeds the model's vocab_size 200",
        ),
    ],
)
def test_data_mismatch_is_found_before_the_engine_starts(demo_shards, tmp_path, change, message):
    data = copy_shards(demo_shards, tmp_path / "data")
    extra = []
    if change == "missing":
        (data / "train-000001.tar").unlink()
    elif change == "seq_len":
        extra = ["train.seq_len=64"]
    else:
        extra = ["model.vocab_size=200"]
    proc = run_trainer(data, tmp_path / "run", 2, *extra, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(message.format(m=data / "manifest.json")), proc.stderr[-2000:]
    assert "DeepSpeed" not in proc.stderr and "resolved config" not in proc.stderr


# -- 14. corruption inside the id range is caught by a per-sample CRC ----------------------------
CRC_KW = dict(seq_len=31, vocab_size=257, global_batch=12, micro_batch=12)


@pytest.fixture
def crc_shards(tmp_path):
    return Path(shards_from_corpus(str(tmp_path), "shards", 36))  # 3 shards of 12 samples


def read_all(path, **kw):
    loader = StreamingLoader(str(path), **CRC_KW, **kw)
    return [loader.next_step() for _ in range(3)]


def token_member(path: Path, sample: int):
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(".tokens.u16")][sample]


def test_flipped_token_bytes_in_range_name_shard_and_sample(crc_shards):
    path = crc_shards / "train-000001.tar"
    member = token_member(path, 5)
    with open(path, "r+b") as f:  # token 2's low byte: 'a'..'z' stays a letter, in range
        f.seek(member.offset_data + 4)
        old = f.read(1)
        f.seek(member.offset_data + 4)
        f.write(bytes([old[0] ^ 0x01]))
    with pytest.raises(
        DataError,
        match=r"^shard train-000001\.tar \(.*\) sample train-000001-000005 \(#5\): CRC32 mismatch",
    ):
        read_all(crc_shards)
    read_all(crc_shards, check_crc=False)  # what happened before: trained on silently


def strip_crc(path: Path) -> None:
    """Rewrite a shard as packers before the CRC table wrote it."""

    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name != CRC_MEMBER:
                tar.addfile(m, io.BytesIO(data))


def test_old_shards_without_crcs_still_load_but_new_ones_must_have_them(crc_shards):
    manifest = json.loads((crc_shards / "manifest.json").read_text())
    assert manifest["fields"]["crc32"] == "__titans__/crc32.u32"
    strip_crc(crc_shards / "train-000000.tar")
    with pytest.raises(DataError, match=r"shard train-000000\.tar .*: no __titans__/crc32\.u32"):
        read_all(crc_shards)
    del manifest["fields"]["crc32"]  # an old manifest: no CRCs promised
    (crc_shards / "manifest.json").write_text(json.dumps(manifest))
    assert sum(len(mb.tokens) for step in read_all(crc_shards) for mb in step) == 36


def test_plain_webdataset_readers_do_not_see_the_crc_table(crc_shards):
    keys = [
        s["__key__"]
        for s in wds.WebDataset(str(crc_shards / "train-000000.tar"), shardshuffle=False)
    ]
    assert len(keys) == 12 and all(k.startswith("train-000000-") for k in keys)
