"""Shared helpers of the tests/test_data_*.py files: small corpora, shard builds, sample hashes."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import webdataset as wds

from data_pipelines.tokenize import TokenizeConfig, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)


def uniform_corpus(path: str, samples: int, seed: int = 0, sample_tokens: int = 32) -> list[str]:
    """A jsonl corpus whose documents are 1 or 2 samples long exactly (bytes tokenizer).

    With T+1 = sample_tokens, a document of n*sample_tokens - 1 random letters plus its EOS
    fills n samples, so the train split holds exactly `samples` samples (val_fraction=0).
    """
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < samples:
        n = min(int(rng.integers(1, 3)), samples - total)
        docs.append(bytes(rng.choice(LETTERS, n * sample_tokens - 1)).decode())
        total += n
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return docs


def build(out: str, sources: list[str], **overrides) -> dict:
    """Run the tokenize job in this process; returns the manifest."""
    return run(TokenizeConfig(sources=sources, out=out, progress=False, **overrides))


def shards_from_corpus(root, name: str, samples: int, seed: int = 0, **overrides) -> str:
    """A uniform corpus of `samples` samples built into root/name (T=31, K=12, no val)."""
    corpus = os.path.join(root, f"{name}.jsonl")
    uniform_corpus(corpus, samples, seed=seed)
    args = {"seq_len": 31, "samples_per_shard": 12, "val_fraction": 0, **overrides}
    build(os.path.join(root, name), [corpus], **args)
    return os.path.join(root, name)


def row_hash(row) -> str:
    """Identity of one sample's tokens, whatever container (tensor or array) holds them."""
    return hashlib.sha1(np.asarray(row, dtype=np.int64).tobytes()).hexdigest()[:16]


def step_hashes(step) -> list[str]:
    """The rows of one step's micro-batches, in order."""
    return [row_hash(row) for mb in step for row in mb.tokens.numpy()]


def plain_read(manifest_dir: str, split: str = "train") -> list[np.ndarray]:
    """Every sample's tokens, shard by shard, with webdataset alone (no loader code)."""
    with open(os.path.join(manifest_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    urls = [os.path.join(manifest_dir, s["name"]) for s in manifest["splits"][split]["shards"]]
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=wds.split_by_node, seed=0, empty_check=False
    )
    field = manifest["fields"]["tokens"]
    dtype = {"tokens.u16": "<u2", "tokens.u32": "<u4"}[field]
    return [np.frombuffer(s[field], dtype=dtype) for s in dataset]


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
