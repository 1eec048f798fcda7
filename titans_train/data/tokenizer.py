"""Tokenizers: the built-in byte-level one ("bytes") or a HF tokenizers tokenizer.json.

The runtime (eval, generate, export) and the offline data jobs (data_pipelines) load them here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from titans_train.data.errors import DataError
from titans_train.data.manifest import ShardManifest, is_url

BYTES = "bytes"
_BYTES_ID = b"titans-train bytes tokenizer v1: ids 0-255 are UTF-8 bytes, 256 is EOS"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


@dataclass
class TextTokenizer:
    """Encodes documents to id arrays (no special tokens: the packer adds EOS itself)."""

    name: str
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str
    path: str | None = None  # tokenizer.json, None for the built-in byte tokenizer
    hf: object = None

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.hf is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        encoded = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.uint32) for e in encoded]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if self.hf is None:
            return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")
        return self.hf.decode(ids.tolist(), skip_special_tokens=False)

    def identity(self) -> dict:
        return {
            "name": self.name,
            "kind": "bytes" if self.hf is None else "tokenizers",
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "file": None if self.path is None else "tokenizer.json",
        }


def load_tokenizer(spec: str, eos_token: str | None = None) -> TextTokenizer:
    """`bytes`, or the path of a tokenizer.json (never a hub name: nothing is downloaded)."""
    if spec == BYTES:
        return TextTokenizer(BYTES, hashlib.sha256(_BYTES_ID).hexdigest(), 257, 256, "<|eos|>")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: use 'bytes' or the path of a tokenizer.json")
    from tokenizers import Tokenizer

    with open(spec, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    try:
        hf = Tokenizer.from_file(spec)
    except Exception as exn:  # tokenizers raises a bare Exception for any bad file
        reason = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        raise ValueError(f"tokenizer {spec}: not a valid tokenizer.json ({reason})") from None
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    found = [(n, hf.token_to_id(n)) for n in names if hf.token_to_id(n) is not None]
    if not found:
        raise ValueError(f"tokenizer {spec}: no EOS token among {names}; pass --eos-token")
    name, eos_id = found[0]
    vocab = max(hf.get_vocab_size(with_added_tokens=True), eos_id + 1)
    return TextTokenizer(os.path.basename(spec), digest, vocab, eos_id, name, spec, hf)


# -- the tokenizer a record names ------------------------------------------------------------------
# A manifest (and an export's config.json) records the identity() of the tokenizer that made the
# shards; eval, generate and export load it from there. The record is untrusted input.
TOKENIZER_FILE = "tokenizer.json"


def recorded_file(identity: dict, folder: Path | None, where: str | Path) -> Path | None:
    """The tokenizer.json an identity names, inside ``folder`` (None for the byte tokenizer or
    when there is no folder, e.g. a remote manifest). The name must be a plain file name: a
    record cannot point a tool at ``../`` or an absolute path."""
    if identity.get("kind") == BYTES or identity.get("name") == BYTES:
        return None
    name = identity.get("file") or TOKENIZER_FILE
    if not isinstance(name, str) or name != os.path.basename(name) or name in (".", ".."):
        raise DataError(f"{where}: tokenizer file {name!r} is not a plain file name; refused")
    return None if folder is None else Path(folder) / name


def tokenizer_from_identity(
    identity: dict, folder: Path | None, where: str | Path
) -> TextTokenizer:
    """The tokenizer an identity records: built in, or its tokenizer.json in ``folder``, which
    must have the recorded sha256. Errors name ``where`` or the file."""
    if identity.get("kind") == BYTES or identity.get("name") == BYTES:
        return load_tokenizer(BYTES)
    file = recorded_file(identity, folder, where)
    if file is None or not file.is_file():
        raise DataError(f"{where}: tokenizer file {file} not found")
    tok = load_tokenizer(str(file), eos_token=identity.get("eos_token"))
    if identity.get("sha256") and tok.sha256 != identity["sha256"]:
        raise DataError(
            f"{file}: sha256 {tok.sha256[:12]} differs from the recorded {identity['sha256'][:12]}"
        )
    return tok


def manifest_identity(manifest: str | ShardManifest) -> tuple[dict, Path | None]:
    """A shard manifest's tokenizer identity, and the folder holding its tokenizer.json (None
    for a remote manifest)."""
    m = manifest if isinstance(manifest, ShardManifest) else ShardManifest.load(manifest)
    folder = None if is_url(m.location) else Path(m.location).parent
    return m.data["tokenizer"], folder
