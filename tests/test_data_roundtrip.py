"""Test 1: tokenize every input format, read the shards back, decode: the source documents."""

import gzip
import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from data_helpers import build, plain_read

from data_pipelines.inspect import manifest_tokenizer, shard_report
from data_pipelines.train_tokenizer import train_tokenizer
from titans_train.data import StreamingLoader
from titans_train.data.manifest import ShardManifest
from titans_train.data.shard_format import ShardRef, read_shard

WORDS = ["alpha", "béta", "γάμμα", "日本語", "🙂", "tab\there", "new\nline", "x" * 40]


def corpus(root: str) -> tuple[list[str], list[str]]:
    """Documents in every input format (field 'body'); returns (sources, documents)."""
    rng = np.random.default_rng(1)
    docs = [
        " ".join(rng.choice(WORDS, int(n))) + f" #{i}"
        for i, n in enumerate(rng.integers(1, 60, 30))
    ]
    os.makedirs(os.path.join(root, "texts"))
    for i, doc in enumerate(docs[:4]):
        with open(os.path.join(root, "texts", f"{i}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)
    with open(os.path.join(root, "texts", "empty.txt"), "w") as f:
        pass  # skipped: empty
    with open(os.path.join(root, "texts", "mod.pyc"), "wb") as f:
        f.write(b"\x00\x01binary")  # skipped: binary
    lines = [json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)]
    with open(os.path.join(root, "a.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines[4:10] + ["\n"])
    with gzip.open(os.path.join(root, "b.jsonl.gz"), "wt", encoding="utf-8") as f:
        f.writelines(lines[10:16])
    with zstandard.open(os.path.join(root, "c.jsonl.zst"), "wt", encoding="utf-8") as f:
        f.writelines(lines[16:22])
    pq.write_table(
        pa.table({"body": docs[22:], "n": list(range(8))}), os.path.join(root, "d.parquet")
    )
    sources = [
        os.path.join(root, "texts"),
        os.path.join(root, "*.jsonl*"),
        os.path.join(root, "d.parquet"),
    ]
    return sources, docs


def split_stream(tokens: list[np.ndarray], eos: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A split's samples joined in shard order, cut at EOS: (complete documents, tail piece)."""
    stream = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    cuts = np.flatnonzero(stream == eos)
    pieces = np.split(stream, cuts + 1)
    return [p[:-1] for p in pieces[:-1]], pieces[-1]


def test_round_trip_bytes_tokenizer(tmp_path):
    sources, docs = corpus(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    manifest = build(
        out, sources, seq_len=31, samples_per_shard=4, val_fraction=0.25, text_field="body"
    )
    eos, t1 = 256, 32
    complete, tails, dropped = [], [], 0
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        samples = plain_read(out, split)
        assert len(samples) == entry["samples"] == sum(s["samples"] for s in entry["shards"])
        assert (
            all(s["samples"] == 4 for s in entry["shards"][:-1])
            and entry["shards"][-1]["samples"] <= 4
        )
        assert all(len(s) == t1 for s in samples)
        docs_here, tail = split_stream(samples, eos)
        complete += [bytes(d.astype(np.uint8)).decode() for d in docs_here]
        tails.append(bytes(tail.astype(np.uint8)))  # may end inside a UTF-8 character
        dropped += entry["dropped_tokens"]
        assert entry["tokens"] == entry["samples"] * t1
    assert not Counter(complete) - Counter(docs)  # every complete piece is a source document
    missing = list((Counter(docs) - Counter(complete)).elements())
    for tail in tails:  # packing cut each split's last document: its start survives
        assert tail == b"" or any(d.encode().startswith(tail) for d in missing)
    assert sum(len(d.encode()) + 1 for d in missing) - sum(len(t) for t in tails) == dropped
    totals = manifest["totals"]
    assert (
        totals["documents"]
        == len(docs)
        == sum(manifest["splits"][s]["documents"] for s in ("train", "val"))
    )
    assert manifest["splits"]["val"]["documents"] == round(len(docs) * 0.25)
    assert totals["tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert totals["text_bytes"] == sum(len(d.encode()) for d in docs)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eos_id"] == eos


def test_doc_starts_mark_every_document_start(tmp_path):
    sources, _ = corpus(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    build(out, sources, seq_len=15, samples_per_shard=8, val_fraction=0.0, text_field="body")
    m = ShardManifest.load(out)
    stream, starts = [], []
    for shard in m.shards("train"):
        ref = ShardRef(m.url(shard), shard.name, shard.samples, shard.sha256, 16, m.dtype, 257)
        data = read_shard(ref)
        for row in range(shard.samples):
            starts += (data.doc_starts(row) + 16 * len(stream)).tolist()
            stream.append(data.tokens[row])
    flat = np.concatenate(stream)
    assert starts == [0] + (np.flatnonzero(flat[:-1] == m.eos_id) + 1).tolist()


def test_round_trip_trained_bpe(tmp_path):
    sources, docs = corpus(str(tmp_path / "in"))
    tok_path = train_tokenizer(
        # --out in a folder that does not exist yet (it once failed on the temp file).
        sources,
        str(tmp_path / "new" / "tok.json"),
        vocab_size=300,
        text_field="body",
        progress=False,
    )
    out = str(tmp_path / "out")
    manifest = build(
        out,
        sources,
        tokenizer=tok_path,
        seq_len=23,
        samples_per_shard=4,
        val_fraction=0.0,
        text_field="body",
    )
    assert manifest["tokenizer"]["kind"] == "tokenizers" and manifest["tokenizer"]["eos_id"] == 0
    tok = manifest_tokenizer(ShardManifest.load(out))  # the copy saved beside the shards
    assert tok.sha256 == manifest["tokenizer"]["sha256"]
    complete, _ = split_stream(plain_read(out), tok.eos_id)
    decoded = [tok.decode(d) for d in complete]
    assert len(decoded) >= len(docs) - 2 and not Counter(decoded) - Counter(docs)
    report = "\n".join(shard_report(ShardManifest.load(out), "train", 0, 1, 10_000))
    assert "<|endoftext|>" in report or any(d[:20] in report for d in docs)


def test_loader_rows_ids_and_doc_start_mask_match_the_shards(tmp_path):
    sources, _ = corpus(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    build(out, sources, seq_len=15, samples_per_shard=8, val_fraction=0.0, text_field="body")
    m = ShardManifest.load(out)
    shards = [
        read_shard(ShardRef(m.url(s), s.name, s.samples, s.sha256, 16, m.dtype, 257))
        for s in m.shards("train")
    ]
    loader = StreamingLoader(out, seq_len=15, vocab_size=257, global_batch=6, micro_batch=3, seed=2)
    for _ in range(10):
        for mb in loader.next_step():
            for tokens, mask, (source, shard, row) in zip(mb.tokens, mb.doc_starts, mb.sample_ids):
                assert source == 0
                assert tokens.tolist() == shards[shard].tokens[row].tolist()
                assert mask.nonzero().flatten().tolist() == shards[shard].doc_starts(row).tolist()
