"""`inspect`: a manifest's summary, token statistics of one shard, and decoded samples."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from titans_train.data.manifest import ShardManifest
from titans_train.data.shard_format import ShardRef, read_shard
from titans_train.data.tokenizer import (
    BYTES,
    TextTokenizer,
    manifest_identity,
    recorded_file,
    tokenizer_from_identity,
)


def manifest_tokenizer(manifest: ShardManifest) -> TextTokenizer | None:
    """The tokenizer that made the shards: built in, or the tokenizer.json saved beside them
    (None when that file is not there, e.g. a remote manifest: ids are shown instead)."""
    identity, folder = manifest_identity(manifest)
    file = recorded_file(identity, folder, manifest.location)
    if identity.get("kind") != BYTES and (file is None or not file.is_file()):
        return None
    return tokenizer_from_identity(identity, folder, manifest.location)


def summary(manifest: ShardManifest) -> list[str]:
    tok, totals = manifest.data["tokenizer"], manifest.data["totals"]
    lines = [
        f"manifest   {manifest.location}",
        f"tokenizer  {tok['name']} ({tok.get('kind')}) vocab {tok['vocab_size']} "
        f"eos {tok['eos_id']} sha256 {tok.get('sha256', '')[:16]}",
        f"samples    T={manifest.seq_len} (+1 tokens) {manifest.dtype}, "
        f"{manifest.samples_per_shard} per shard",
        f"totals     {totals['documents']} documents, {totals['text_bytes']} text bytes, "
        f"{totals['tokens']} tokens, {totals['bytes']} shard bytes",
    ]
    for split, entry in manifest.data["splits"].items():
        lines.append(
            f"{split:<10} {entry['documents']} documents, {entry['samples']} samples in "
            f"{len(entry['shards'])} shards, {entry['dropped_tokens']} tail tokens dropped"
        )
    return lines


def shard_report(
    manifest: ShardManifest, split: str, index: int, samples: int, chars: int
) -> list[str]:
    shard = manifest.shards(split)[index]
    ref = ShardRef(
        manifest.url(shard),
        shard.name,
        shard.samples,
        shard.sha256,
        manifest.sample_tokens,
        manifest.dtype,
        manifest.vocab_size,
    )
    data = read_shard(ref)
    docs = np.diff(data.starts_ptr)
    ids, counts = np.unique(data.tokens, return_counts=True)
    tok = manifest_tokenizer(manifest)
    top = ids[np.argsort(-counts, kind="stable")[:10]]
    shown = [repr(tok.decode([i])) if tok else str(i) for i in top]
    lines = [
        f"shard      {shard.name}: {shard.samples} samples, {len(ids)} distinct ids, "
        f"{docs.mean():.2f} document starts per sample, "
        f"{(data.tokens == manifest.eos_id).sum(axis=1).mean():.2f} EOS per sample",
        f"top ids    {', '.join(shown)}",
    ]
    for row in range(min(samples, shard.samples)):
        lines.append(f"--- {data.keys[row]} doc_starts {data.doc_starts(row).tolist()}")
        if tok is None:
            lines.append(" ".join(map(str, data.tokens[row][:64])) + " ...")
            continue
        pieces = np.split(data.tokens[row], np.flatnonzero(data.tokens[row] == manifest.eos_id))
        text = "".join(
            (tok.eos_token if i else "") + tok.decode(p[1 if i else 0 :])
            for i, p in enumerate(pieces)
        )
        lines.append(text[:chars] + (" ..." if len(text) > chars else ""))
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="manifest.json, or the directory holding it, or a URL")
    p.add_argument("--split", default="train", help="split to look into")
    p.add_argument("--shard", type=int, default=0, help="index of the shard in the split")
    p.add_argument("--samples", type=int, default=2, help="how many samples to decode")
    p.add_argument("--chars", type=int, default=600, help="characters shown per sample")


def run_args(args: argparse.Namespace) -> int:
    manifest = ShardManifest.load(args.manifest)
    lines = summary(manifest)
    if manifest.shards(args.split):
        lines += shard_report(manifest, args.split, args.shard, args.samples, args.chars)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from data_pipelines.cli import main

    raise SystemExit(main(["inspect", *sys.argv[1:]]))
