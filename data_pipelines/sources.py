"""Corpus inputs: text files, directories and globs; .jsonl(.gz|.zst); parquet.

One document per plain-text file or per record. Files are listed in sorted order so a corpus
always yields the same document sequence. Empty documents and binary files (a NUL byte in the
first 8 KiB) are skipped.

Text is decoded strictly (UTF-8 by default): bytes that do not decode stop the job with an
error naming the file and line, unless ``errors="replace"``, which puts U+FFFD in their place
and counts every replacement (the manifest records the count).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

ERRORS = ("strict", "replace")


class InputError(ValueError):
    """A corpus file that cannot be read as documents; the message names the file and line."""


@dataclass
class DecodeStats:
    """Replacements made under errors="replace": total and per file."""

    replaced: int = 0
    files: dict[str, int] = field(default_factory=dict)


class _Decoder:
    """Decodes byte strings of one file; counts what ``errors="replace"`` replaced."""

    def __init__(self, path: str, encoding: str, errors: str, stats: DecodeStats | None):
        if errors not in ERRORS:
            raise InputError(f"errors={errors!r}: expected one of {', '.join(ERRORS)}")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise InputError(f"unknown text encoding {encoding!r}") from None
        self.path, self.encoding, self.errors, self.stats = path, encoding, errors, stats

    def __call__(self, data: bytes, lineno: int = 1) -> str:
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                line = lineno + data.count(b"\n", 0, e.start)
                raise InputError(
                    f"{self.path}:{line}: not valid {self.encoding} (byte "
                    f"0x{data[e.start]:02x}: {e.reason}); pass --encoding (e.g. latin-1) or "
                    "--errors replace"
                ) from None
        text, n = _decode_counting(data, self.encoding)
        if self.stats is not None and n:
            self.stats.replaced += n
            self.stats.files[self.path] = self.stats.files.get(self.path, 0) + n
        return text


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


def _decode_counting(data: bytes, encoding: str) -> tuple[str, int]:
    """What errors="replace" gives (one U+FFFD per undecodable sequence), and how many."""
    count = 0

    def counting(e: UnicodeDecodeError) -> tuple[str, int]:
        nonlocal count
        count += 1
        return "\ufffd", e.end

    codecs.register_error("titans-count", counting)
    return data.decode(encoding, errors="titans-count"), count


def _open_binary(path: str) -> BinaryIO:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader has no readline
    return open(path, "rb")


def _jsonl_documents(path: str, text_field: str, decode: _Decoder) -> Iterator[str]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = decode(raw, lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exn:
                raise InputError(f"{path}:{lineno}: not a JSON record ({exn})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str) and not (
                isinstance(record, dict) and text_field in record
            ):
                raise InputError(f"{path}:{lineno}: no text field {text_field!r} (a string)")
            if text:
                yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pfile = pq.ParquetFile(path)
    if text_field not in pfile.schema_arrow.names:
        raise InputError(f"{path}: no column {text_field!r} (has {pfile.schema_arrow.names})")
    for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def file_documents(
    path: str,
    text_field: str = "text",
    encoding: str = "utf-8",
    errors: str = "strict",
    stats: DecodeStats | None = None,
) -> Iterator[str]:
    decode = _Decoder(path, encoding, errors, stats)
    if path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, text_field, decode)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, text_field)
    else:
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" not in data[:8192]:  # binary files (.pyc, images) are not text documents
            yield decode(data)


def iter_documents(
    files: Sequence[str],
    text_field: str = "text",
    encoding: str = "utf-8",
    errors: str = "strict",
    stats: DecodeStats | None = None,
) -> Iterator[str]:
    """Every non-empty document of `files`, in order (decoding: module docstring)."""
    for path in files:
        for text in file_documents(path, text_field, encoding, errors, stats):
            if text:
                yield text
