"""Phase 1 of `tokenize`: documents -> tokenized chunk files in the work directory.

The document stream is cut into chunks (a bounded number of documents and bytes) in stream
order. A worker tokenizes one chunk and writes `chunk-N.tokens.npy`, then `chunk-N.lengths.npy`
(per document: tokens, UTF-8 bytes); the lengths file is the commit marker, so `--resume` skips
exactly the chunks that are complete. The chunk size does not change the output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from titans_train.data.tokenizer import TextTokenizer, load_tokenizer
from titans_train.fsutil import write_atomically

_TOKENIZER: TextTokenizer | None = None


def init_worker(spec: str, eos_token: str | None) -> None:
    """Load the tokenizer once per process; one thread each, the processes are the parallelism.

    With --workers 1 this runs in the calling process and leaves TOKENIZERS_PARALLELISM=false.
    """
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = load_tokenizer(spec, eos_token)


def chunk_paths(workdir: str, index: int) -> tuple[str, str]:
    base = os.path.join(workdir, f"chunk-{index:06d}")
    return base + ".tokens.npy", base + ".lengths.npy"


def chunk_done(workdir: str, index: int) -> bool:
    return os.path.exists(chunk_paths(workdir, index)[1])


def group_documents(docs: Iterable[str], max_docs: int, max_bytes: int) -> Iterator[list[str]]:
    """Consecutive documents in lists of at most max_docs and (about) max_bytes characters."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if len(chunk) >= max_docs or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_chunk(task: tuple[str, int, list[str], str]) -> np.ndarray:
    """Tokenize one chunk and commit its files; returns the [docs, 2] (tokens, bytes) table."""
    workdir, index, texts, dtype = task
    assert _TOKENIZER is not None, "init_worker was not called"
    arrays = _TOKENIZER.encode_batch(texts)
    table = np.array([(len(a), len(t.encode("utf-8"))) for a, t in zip(arrays, texts)], np.int64)
    tokens = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    tokens_path, lengths_path = chunk_paths(workdir, index)
    write_atomically(tokens_path, lambda f: np.save(f, tokens))
    write_atomically(lengths_path, lambda f: np.save(f, table))
    return table


def load_lengths(workdir: str, index: int) -> np.ndarray:
    return np.load(chunk_paths(workdir, index)[1])


def load_tokens(workdir: str, index: int) -> np.ndarray:
    return np.load(chunk_paths(workdir, index)[0], mmap_mode="r")
