"""manifest.json: what a tokenize job wrote (schema in docs/data.md) and how to read it back."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass

import webdataset as wds

from titans_train.data.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "titans-shards"
VERSION = 1
SPLITS = ("train", "val")
# A shard name is a plain file name: it is joined to the manifest's directory and, for `pipe:`
# manifests, substituted into a shell command, so no separators, `..` or shell syntax.
SHARD_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def is_url(path: str) -> bool:
    """A location webdataset opens itself (pipe: command or URL), not a local path."""
    return path.startswith("pipe:") or "://" in path


def _locate(path: str) -> str:
    """A directory means the manifest inside it; anything else is the manifest itself."""
    if not is_url(path) and os.path.isdir(path):
        return os.path.join(path, MANIFEST_NAME)
    if is_url(path) and path.endswith("/"):
        return path + MANIFEST_NAME
    return path


def _read_text(location: str) -> str:
    if not is_url(location):
        if not os.path.exists(location):
            raise DataError(
                f"no manifest at {location}: build shards with `titans-data tokenize` "
                f"(or pass the directory that holds {MANIFEST_NAME})"
            )
        with open(location, encoding="utf-8") as f:
            return f.read()
    try:
        with wds.gopen(location, "rb") as stream:
            return stream.read().decode("utf-8")
    except Exception as exn:  # gopen raises many types (IOError, subprocess errors)
        raise DataError(f"cannot read manifest {location}: {exn}") from exn


def _require(data: dict, key: str, kind: type, where: str):
    if key not in data or not isinstance(data[key], kind):
        raise DataError(f"manifest {where}: missing or malformed field {key!r}")
    return data[key]


@dataclass(frozen=True)
class ShardManifest:
    """A parsed manifest. Shard URLs are the manifest's location with its file name replaced."""

    location: str
    data: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardManifest:
        location = _locate(os.fspath(path))
        text = _read_text(location)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exn:
            raise DataError(f"manifest {location} is not valid JSON: {exn}") from exn
        manifest = cls(location, data)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        where = self.location
        if self.data.get("format") != FORMAT or self.data.get("version") != VERSION:
            raise DataError(
                f"manifest {where}: format {self.data.get('format')!r} version "
                f"{self.data.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        tok = _require(self.data, "tokenizer", dict, where)
        for key in ("vocab_size", "eos_id"):
            _require(tok, key, int, where)
        for key in ("seq_len", "samples_per_shard"):
            if _require(self.data, key, int, where) < 1:
                raise DataError(f"manifest {where}: {key} must be positive")
        if self.data.get("dtype") not in ("uint16", "uint32"):
            raise DataError(f"manifest {where}: dtype must be uint16 or uint32")
        splits = _require(self.data, "splits", dict, where)
        for split, entry in splits.items():
            shards = self.shards(split)
            for shard in shards:
                name = shard.name
                if not isinstance(name, str) or not SHARD_NAME_RE.fullmatch(name) or ".." in name:
                    raise DataError(
                        f"manifest {where}: shard name {name!r} in split {split} is not a "
                        "plain file name (letters, digits, '._+-'; no path, '..' or shell "
                        "characters); refusing the manifest"
                    )
            for i, shard in enumerate(shards):
                last = i == len(shards) - 1
                if not 1 <= shard.samples <= self.samples_per_shard or (
                    not last and shard.samples != self.samples_per_shard
                ):
                    raise DataError(
                        f"manifest {where}: shard {shard.name} claims {shard.samples} samples; "
                        f"every shard but the last of a split holds exactly "
                        f"{self.samples_per_shard}"
                    )
            if sum(s.samples for s in shards) != entry.get("samples"):
                raise DataError(f"manifest {where}: split {split} sample total disagrees")

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def sample_tokens(self) -> int:
        return self.seq_len + 1

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.data["tokenizer"]["eos_id"]

    @property
    def sample_crc(self) -> bool:
        """The shards carry a per-sample CRC32 table (shard_format.py)."""
        return bool(self.data.get("fields", {}).get("crc32"))

    @property
    def samples_per_shard(self) -> int:
        return self.data["samples_per_shard"]

    def shards(self, split: str) -> list[ShardInfo]:
        entry = self.data["splits"].get(split)
        if entry is None:
            return []
        try:
            return [
                ShardInfo(s["name"], s["samples"], s["bytes"], s["sha256"]) for s in entry["shards"]
            ]
        except (KeyError, TypeError) as exn:
            raise DataError(f"manifest {self.location}: malformed shard entry ({exn})") from exn

    def url(self, shard: ShardInfo) -> str:
        head, sep, tail = self.location.rpartition(MANIFEST_NAME)
        if not sep:  # a manifest saved under another name: shards sit next to it
            head, tail = os.path.dirname(self.location) + os.sep, ""
        # webdataset runs a `pipe:` URL through a shell: quote the name that goes into it (a
        # validated name needs no quotes, so this only matters if validation is bypassed).
        name = shlex.quote(shard.name) if self.location.startswith("pipe:") else shard.name
        return head + name + tail

    def fingerprint(self, split: str) -> str:
        """Identity of a split's data: the shard hashes and the packing parameters."""
        parts = [self.dtype, str(self.seq_len), self.data["tokenizer"].get("sha256", "")]
        parts += [f"{s.name}:{s.samples}:{s.sha256}" for s in self.shards(split)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
