"""Corpus inputs: text files, directories and globs; .jsonl(.gz|.zst); parquet.

One document per plain-text file or per record. Files are listed in sorted order so a corpus
always yields the same document sequence. Empty documents and binary files (a NUL byte in the
first 8 KiB) are skipped.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)


def expand_sources(specs: Sequence[str]) -> list[str]:
    """Files named by `specs` (files, directories walked recursively, or globs), in order."""
    files: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(spec):
            matches = sorted(
                os.path.join(root, name)
                for root, dirs, names in os.walk(spec)
                for name in names
                if not name.startswith(".")
            )
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            raise FileNotFoundError(f"input {spec!r} is not a file, directory or matching glob")
        if not matches:
            raise FileNotFoundError(f"input {spec!r} matches no files")
        files.extend(matches)
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard

        return zstandard.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as exn:
                raise ValueError(f"{path}:{lineno}: no text field {text_field!r} ({exn})") from exn
            yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pfile = pq.ParquetFile(path)
    if text_field not in pfile.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (has {pfile.schema_arrow.names})")
    for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def file_documents(path: str, text_field: str = "text") -> Iterator[str]:
    if path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, text_field)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, text_field)
    else:
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" not in data[:8192]:  # binary files (.pyc, images) are not text documents
            yield data.decode("utf-8", errors="replace")


def iter_documents(files: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of `files`, in order."""
    for path in files:
        for text in file_documents(path, text_field):
            if text:
                yield text
