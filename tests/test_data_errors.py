"""Test 5: every bad input gives a DataError naming the shard and sample, never a hang."""

import os
import shutil
import tarfile

import pytest
from data_helpers import shards_from_corpus

from titans_train.data import DataError, StreamingLoader

KW = dict(seq_len=31, vocab_size=257, global_batch=12, micro_batch=2, seed=7, interleave=4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shards_from_corpus(root, "shards", 48)
    shards_from_corpus(root, "short", 48, seq_len=15, samples_per_shard=24)
    return root


@pytest.fixture
def shards(pristine, tmp_path):
    shutil.copytree(pristine / "shards", tmp_path / "shards")
    return tmp_path / "shards"


def read_epoch(path, **kw):
    loader = StreamingLoader(str(path), **{**KW, **kw})
    for _ in range(4):  # 48 samples
        loader.next_step()


def token_offset(path, sample: int) -> tuple[str, int]:
    """(key, file offset) of the token payload of the sample-th sample of a shard."""
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".tokens.u16")][sample]
        return member.name.split(".")[0], member.offset_data


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=f"no manifest at {tmp_path}/manifest.json"):
        StreamingLoader(str(tmp_path), **KW)
    with pytest.raises(DataError, match="cannot read manifest pipe:cat /nonexistent/manifest.json"):
        StreamingLoader("pipe:cat /nonexistent/manifest.json", **KW)


def test_missing_shard(shards):
    os.remove(shards / "train-000002.tar")
    with pytest.raises(
        DataError, match=r"shard train-000002.tar listed in .*manifest.json is missing"
    ):
        StreamingLoader(str(shards), **KW)
    # behind a URL the loader cannot stat: found when read
    with pytest.raises(DataError, match=r"shard train-000002.tar \(pipe:cat .*\): cannot read"):
        read_epoch(f"pipe:cat {shards}/manifest.json")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard(shards, num_workers):
    path = shards / "train-000001.tar"
    key, offset = token_offset(path, 7)
    os.truncate(path, offset + 10)  # cut inside the 8th sample's tokens
    with pytest.raises(
        DataError, match=r"shard train-000001.tar .*(after sample train-000001-000006|7 samples)"
    ):
        read_epoch(shards, num_workers=num_workers)


def test_shard_cut_at_a_member_boundary(shards):
    path = shards / "train-000001.tar"
    key, _ = token_offset(path, 5)
    with tarfile.open(path) as tar:
        first = min(m.offset for m in tar.getmembers() if m.name.startswith(key + "."))
    os.truncate(path, first)  # before the 6th sample's first header: a clean-looking tar
    with pytest.raises(DataError, match="shard train-000001.tar .*: 5 samples, manifest says 12"):
        read_epoch(shards)


def test_sha256_mismatch_when_verifying(shards):
    path = shards / "train-000003.tar"
    _, offset = token_offset(path, 0)
    patch(path, offset, b"Z")  # still a valid tar with valid ids
    read_epoch(shards, check_crc=False)  # neither hashed nor CRC-checked: goes unseen
    with pytest.raises(DataError, match="shard train-000003.tar .*: sha256 mismatch"):
        read_epoch(shards, verify=True)


def test_token_id_out_of_vocabulary(shards):
    path = shards / "train-000000.tar"
    key, offset = token_offset(path, 4)
    patch(path, offset + 2 * 3 + 1, b"\x07")  # high byte of token 3: id >= 7 * 256
    with pytest.raises(
        DataError,
        match=f"train-000000.tar .* sample {key} .* position 3: token id 1[89]\\d\\d >= vocab_size",
    ):
        read_epoch(shards, check_crc=False)  # as for shards without CRCs (the CRC catches it)


def test_seq_len_differs_from_the_model(shards, pristine):
    with pytest.raises(DataError, match="samples hold seq_len 31 .* model expects seq_len 64"):
        StreamingLoader(str(shards), **{**KW, "seq_len": 64})
    # a shard of another T under a manifest that claims this T: caught per sample
    shutil.copy(pristine / "short" / "train-000000.tar", shards / "train-000002.tar")
    with pytest.raises(
        DataError,
        match=r"train-000002.tar .* train-000000-000000 \(#0\): 32 token bytes, expected 32 x",
    ):
        read_epoch(shards)


def test_vocabulary_larger_than_the_model(shards):
    with pytest.raises(
        DataError, match="tokenizer vocab_size 257 exceeds the model's vocab_size 200"
    ):
        StreamingLoader(str(shards), **{**KW, "vocab_size": 200})


def test_resume_onto_other_data_is_refused(shards):
    state = StreamingLoader(str(shards), **KW).state_dict()
    other = StreamingLoader(str(shards), **{**KW, "seed": 8})
    with pytest.raises(DataError, match="loader state was saved for data/order"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
