"""Pre-tokenized examples with a loss mask -> shards + manifest.json, one example per sample.

For tasks whose loss belongs on some tokens only (the answers of MQAR, as in Zoology; the
digits of a pass key): each example has exactly ``seq_len`` tokens and a boolean mask of the
tokens that carry loss as targets. Sample i is example i followed by EOS (which carries no
loss), with a document start at 0, in the seeded shuffle and train/val split of ``tokenize``;
the mask goes into each sample's ``loss_mask`` member (titans_train/data/shard_format.py). The
shards and manifest have the format ``tokenize`` writes, so every reader takes them; readers
that predate the member see plain samples with the loss on every token.

    from data_pipelines.examples import answer_mask, write_examples
    examples = synthetic.generate("mqar", 128, 1000, encode)
    write_examples(out, [e.tokens for e in examples], [answer_mask(e) for e in examples])
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import webdataset as wds

from data_pipelines import packing
from titans_train import __version__
from titans_train.data.manifest import FORMAT, MANIFEST_NAME, SPLITS, VERSION
from titans_train.data.shard_format import (
    CRC_MEMBER,
    DOC_STARTS_FIELD,
    LOSS_MASK_FIELD,
    crc_record,
    encode_sample,
    sha256_of,
    token_dtype,
    tokens_field,
)
from titans_train.data.tokenizer import load_tokenizer
from titans_train.fsutil import write_atomically, write_json_atomically
from titans_train.synthetic import Example


def answer_mask(example: Example) -> np.ndarray:
    """True on the tokens of the example's answer spans: the targets that carry loss."""
    mask = np.zeros(len(example.tokens), dtype=bool)
    for start, end in example.answers:
        mask[start:end] = True
    return mask


def _check(examples: Sequence, masks: Sequence, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    if not examples or len(examples) != len(masks):
        raise ValueError(f"{len(examples)} examples and {len(masks)} masks: need as many, > 0")
    lengths = {len(e) for e in examples} | {len(m) for m in masks}
    if len(lengths) != 1:
        raise ValueError(f"examples and masks must all have one length (seq_len), got {lengths}")
    tokens = np.asarray([np.asarray(e, dtype=np.int64) for e in examples])
    mask = np.asarray([np.asarray(m, dtype=bool) for m in masks])
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the tokenizer's vocabulary)")
    if not mask.any(axis=1).all():
        raise ValueError(f"example {int(np.argmin(mask.any(axis=1)))}: no token carries loss")
    return tokens, mask


def _doc_starts(starts: Sequence[Sequence[int]] | None, n: int, seq_len: int) -> list:
    """Each example's document starts: 0 and the given ones, which must rise within the row."""
    if starts is None:
        return [np.zeros(1, np.int64)] * n
    if len(starts) != n:
        raise ValueError(f"{len(starts)} lists of document starts for {n} examples: need as many")
    out = []
    for i, given in enumerate(starts):
        pos = np.asarray([0, *given], dtype=np.int64)
        if (np.diff(pos) <= 0).any() or pos[-1] >= seq_len:
            raise ValueError(
                f"example {i}: document starts {list(given)} must rise within (0, {seq_len})"
            )
        out.append(pos)
    return out


def _write_shard(path: str, samples: list[dict]) -> dict:
    def write(f) -> None:
        with wds.TarWriter(f, encoder=False, mtime=0, user="titans", group="titans") as w:
            w.write(crc_record(samples))
            for sample in samples:
                w.write(sample)

    write_atomically(path, write)
    name = os.path.basename(path)
    size, digest = os.path.getsize(path), sha256_of(path)
    return {"name": name, "samples": len(samples), "bytes": size, "sha256": digest}


def write_examples(
    out: str,
    examples: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]],
    tokenizer: str = "bytes",
    samples_per_shard: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    starts: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Write the shards and manifest (module doc) into ``out``; returns the manifest.
    ``starts``: per example, where documents start besides 0 (an example made of several
    documents, e.g. filler before a task; the model restarts there under document masking)."""
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    tokens, mask = _check(examples, masks, tok.vocab_size)
    n, seq_len = tokens.shape
    docs = _doc_starts(starts, n, seq_len)
    rows = np.concatenate([tokens, np.full((n, 1), tok.eos_id)], axis=1).astype(dtype)
    loss = np.concatenate([mask, np.zeros((n, 1), dtype=bool)], axis=1)
    os.makedirs(out, exist_ok=True)
    splits = {}
    for split, order in packing.split_documents(n, seed, val_fraction).items():
        shards = []
        for s, a in enumerate(range(0, len(order), samples_per_shard)):
            prefix = f"{split}-{s:06d}"
            samples = [
                encode_sample(f"{prefix}-{i:06d}", rows[j], docs[j], loss[j])
                for i, j in enumerate(order[a : a + samples_per_shard].tolist())
            ]
            shards.append(_write_shard(os.path.join(out, f"{prefix}.tar"), samples))
        m = len(order)
        splits[split] = {
            "documents": sum(len(docs[j]) for j in order.tolist()), "samples": m,
            "tokens": m * (seq_len + 1), "dropped_tokens": 0, "shards": shards,
        }  # fmt: skip
    assert set(splits) == set(SPLITS)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created_by": f"titans-train {__version__} data_pipelines.examples",
        "tokenizer": tok.identity(),
        "seq_len": seq_len,
        "sample_tokens": seq_len + 1,
        "dtype": dtype.name,
        "samples_per_shard": samples_per_shard,
        "fields": {
            "tokens": tokens_field(dtype),
            "doc_starts": DOC_STARTS_FIELD,
            "loss_mask": LOSS_MASK_FIELD,
            "crc32": CRC_MEMBER,
        },
        "splits": splits,
        "totals": {
            "documents": n,
            "samples": n,
            "tokens": n * (seq_len + 1),
            "loss_tokens": int(mask.sum()),
            "shards": sum(len(s["shards"]) for s in splits.values()),
        },
        "config": {
            "tokenizer": tokenizer,
            "seq_len": seq_len,
            "seed": seed,
            "samples_per_shard": samples_per_shard,
            "val_fraction": val_fraction,
        },
    }
    if tok.path is not None:
        with open(tok.path, "rb") as f:
            data = f.read()
        write_atomically(os.path.join(out, "tokenizer.json"), lambda f: f.write(data))
    write_json_atomically(os.path.join(out, MANIFEST_NAME), manifest)  # last: the commit
    return manifest
