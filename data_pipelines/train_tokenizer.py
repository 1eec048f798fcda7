"""`train-tokenizer`: a byte-level BPE tokenizer.json trained on a corpus with HF tokenizers.

Byte-level means every string encodes (no unknown tokens) and decodes back exactly. The EOS
token is the one special token (id 0). The corpus inputs are those of `tokenize`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from data_pipelines.sources import ERRORS, expand_sources, iter_documents
from titans_train.fsutil import write_atomically


def train_tokenizer(
    sources: list[str],
    out: str,
    vocab_size: int = 8192,
    text_field: str = "text",
    min_frequency: int = 2,
    eos_token: str = "<|endoftext|>",
    progress: bool = True,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> str:
    """Train and write `out`; returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = iter_documents(expand_sources(sources), text_field, encoding, errors)
    tok.train_from_iterator(tqdm(docs, desc="read", unit="doc", disable=not progress), trainer)
    text = tok.to_str(pretty=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # as tokenize does for its --out
    write_atomically(out, lambda f: f.write(text.encode("utf-8")))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help="text files, directories, globs, jsonl, parquet")
    p.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge")
    p.add_argument("--eos-token", default="<|endoftext|>", help="the EOS special token")
    p.add_argument("--text-field", default="text", help="text field of jsonl / parquet records")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt and .jsonl inputs")
    p.add_argument("--errors", choices=ERRORS, default="strict", help="undecodable bytes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_args(args: argparse.Namespace) -> int:
    path = train_tokenizer(
        args.sources,
        args.out,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        min_frequency=args.min_frequency,
        eos_token=args.eos_token,
        progress=args.progress,
        encoding=args.encoding,
        errors=args.errors,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from data_pipelines.cli import main

    raise SystemExit(main(["train-tokenizer", *sys.argv[1:]]))
