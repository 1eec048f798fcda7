"""One packed sample in a tar shard, and reading a whole shard back with checks.

A sample is one or two tar members under one key: `<key>.tokens.u16` (or `.u32`), the T+1 token
ids as raw little-endian integers, and `<key>.doc_starts.u32`, the positions in the sample where
a document begins, left out when there are none (tar spends 1 KiB per member). Raw integers
decode with one `np.frombuffer`; the manifest holds the dtype. TarWriter writes members in
sorted order, so doc_starts precedes tokens and a cut-off shard cannot lose it unnoticed.

A third, optional member `<key>.loss_mask.u8` marks the tokens that carry loss as targets (for
example the answers of a recall task, as in Zoology's MQAR): np.packbits of T+1 booleans, True
where the token is a target the loss counts. It is written only when some token carries none;
without it every token counts, as in every shard written before it existed.

Integrity: the first member of a shard, `__titans__/crc32.u32`, holds one CRC32 per sample (of
its tokens bytes, then its doc_starts bytes), checked as each sample is read, so a flipped byte
that keeps ids in range is caught by default at a measured cost (docs/benchmarks.md). webdataset
readers skip `__...__/` members, so plain pipelines see the same samples as before. Shards
without it (older ones) still load, unchecked, unless their manifest lists the field.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from titans_train.data.errors import DataError

DOC_STARTS_FIELD = "doc_starts.u32"
LOSS_MASK_FIELD = "loss_mask.u8"
CRC_KEY, CRC_EXT = "__titans__/crc32", "u32"
CRC_MEMBER = f"{CRC_KEY}.{CRC_EXT}"
_CHUNK = 1 << 22
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


def sample_crc(sample: dict) -> int:
    """CRC32 of a sample's tokens bytes followed by its doc_starts and loss_mask bytes (an
    absent member adds nothing, so samples without a loss mask keep their CRC)."""
    raw = next(v for k, v in sample.items() if k.startswith("tokens."))
    crc = zlib.crc32(sample.get(DOC_STARTS_FIELD, b""), zlib.crc32(raw))
    return zlib.crc32(sample.get(LOSS_MASK_FIELD, b""), crc)


def crc_record(samples: list[dict]) -> dict:
    """The member dict of the per-sample CRC table, written before the samples."""
    crcs = np.array([sample_crc(s) for s in samples], dtype="<u4")
    return {"__key__": CRC_KEY, CRC_EXT: crcs.tobytes()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokens_field(dtype: str | np.dtype) -> str:
    return "tokens.u16" if np.dtype(dtype).itemsize == 2 else "tokens.u32"


def encode_sample(
    key: str, tokens: np.ndarray, doc_starts: np.ndarray, loss_mask: np.ndarray | None = None
) -> dict:
    """The member dict that webdataset's TarWriter writes for one sample. ``loss_mask``: bool
    per token, True where the token carries loss as a target (None, or all True: every token)."""
    sample = {
        "__key__": key,
        tokens_field(tokens.dtype): tokens.astype(tokens.dtype.newbyteorder("<")).tobytes(),
    }
    if len(doc_starts):
        sample[DOC_STARTS_FIELD] = np.asarray(doc_starts, dtype="<u4").tobytes()
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask, dtype=bool)
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"sample {key}: loss_mask {loss_mask.shape} != tokens {tokens.shape}")
        if not loss_mask.all():
            sample[LOSS_MASK_FIELD] = np.packbits(loss_mask).tobytes()
    return sample


@dataclass(frozen=True)
class ShardRef:
    """Everything needed to read and check one shard (picklable for DataLoader workers)."""

    url: str
    name: str
    samples: int
    sha256: str
    sample_tokens: int
    dtype: str
    vocab_size: int
    verify: bool = False
    crc: bool = False  # the manifest promises a CRC table (a missing one is an error)
    check_crc: bool = True  # check each sample against the table when the shard has one


@dataclass
class ShardData:
    """A decoded shard: tokens [n, T+1], per-sample doc starts (CSR) and the same as bit masks."""

    keys: list[str]
    tokens: np.ndarray
    starts: np.ndarray
    starts_ptr: np.ndarray
    start_bits: np.ndarray  # np.packbits of the [n, T+1] "a document begins here" mask
    loss_bits: np.ndarray | None = None  # np.packbits of [n, T+1] "carries loss"; None: all

    def doc_starts(self, row: int) -> np.ndarray:
        return self.starts[self.starts_ptr[row] : self.starts_ptr[row + 1]]


def sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    with wds.gopen(url, "rb") as stream:
        while block := stream.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _samples(ref: ShardRef):
    """The shard's records in order, grouped by key as webdataset groups them, but including
    the `__titans__/` member that webdataset's own reader skips."""
    with wds.gopen(ref.url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        record: dict | None = None
        for info in tar:
            match = _KEY_EXT.match(info.name) if info.isreg() else None
            if match is None:
                continue
            key, ext = match.groups()
            data = tar.extractfile(info).read()
            tar.members = []  # streaming: keep no TarInfo list
            if record is not None and record["__key__"] != key:
                yield record
                record = None
            if record is None:
                record = {"__key__": key}
            record[ext] = data
        if record is not None:
            yield record


def read_shard(ref: ShardRef) -> ShardData:
    """Read, decode and check a shard; every failure is a DataError naming shard and sample."""
    where = f"shard {ref.name} ({ref.url})"
    if ref.verify:
        try:
            actual = sha256_of(ref.url)
        except Exception as exn:
            raise DataError(f"{where}: cannot read: {exn}") from exn
        if actual != ref.sha256:
            raise DataError(f"{where}: sha256 mismatch: manifest {ref.sha256}, file {actual}")
    field = tokens_field(ref.dtype)
    dtype = np.dtype(ref.dtype).newbyteorder("<")
    expect_bytes = ref.sample_tokens * dtype.itemsize
    tokens = np.empty((ref.samples, ref.sample_tokens), dtype=dtype)
    keys: list[str] = []
    starts: list[bytes] = []
    masks: dict[int, bytes] = {}
    mask_bytes = -(-ref.sample_tokens // 8)
    count, key, crcs = 0, None, None
    try:
        for sample in _samples(ref):
            if sample["__key__"] == CRC_KEY:
                crcs = np.frombuffer(sample[CRC_EXT], dtype="<u4") if ref.check_crc else None
                continue
            if ref.crc and ref.check_crc and crcs is None:
                raise DataError(f"{where}: no {CRC_MEMBER} before its first sample")
            key = sample["__key__"]
            what = f"{where} sample {key} (#{count})"
            raw = sample.get(field)
            if raw is None:
                raise DataError(f"{what}: no {field} member (has {sorted(sample)})")
            if len(raw) != expect_bytes:
                raise DataError(
                    f"{what}: {len(raw)} token bytes, expected {ref.sample_tokens} x "
                    f"{dtype.itemsize} (truncated shard, or a seq_len other than the manifest's)"
                )
            if count >= ref.samples:
                raise DataError(f"{where}: more than the {ref.samples} samples the manifest lists")
            if crcs is not None:
                _check_crc(what, sample, crcs, count)
            tokens[count] = np.frombuffer(raw, dtype=dtype)
            starts.append(sample.get(DOC_STARTS_FIELD, b""))
            if LOSS_MASK_FIELD in sample:
                if len(sample[LOSS_MASK_FIELD]) != mask_bytes:
                    raise DataError(
                        f"{what}: {len(sample[LOSS_MASK_FIELD])} {LOSS_MASK_FIELD} bytes, "
                        f"expected {mask_bytes} (one bit per token)"
                    )
                masks[count] = sample[LOSS_MASK_FIELD]
            keys.append(key)
            count += 1
    except DataError:
        raise
    except Exception as exn:  # tarfile/gopen errors: missing file, truncated archive, bad URL
        after = f" after sample {key} (#{count - 1})" if key is not None else ""
        raise DataError(f"{where}: cannot read{after}: {exn}") from exn
    if count != ref.samples:
        raise DataError(
            f"{where}: {count} samples, manifest says {ref.samples} (truncated or wrong shard)"
        )
    _check_ids(ref, where, tokens, keys)
    ptr = np.zeros(count + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(s) for s in starts]) // 4
    flat = np.frombuffer(b"".join(starts), dtype="<u4").astype(np.int64)
    if (flat >= ref.sample_tokens).any():
        raise DataError(f"{where}: a doc_starts entry lies outside its sample")
    mask = np.zeros(tokens.shape, dtype=bool)
    mask[np.repeat(np.arange(count), np.diff(ptr)), flat] = True
    loss = None
    if masks:  # rows without the member: every token counts (all bits set)
        loss = np.full((count, mask_bytes), 0xFF, dtype=np.uint8)
        for row, raw in masks.items():
            loss[row] = np.frombuffer(raw, dtype=np.uint8)
    return ShardData(keys, tokens, flat, ptr, np.packbits(mask, axis=1), loss)


def _check_ids(ref: ShardRef, where: str, tokens: np.ndarray, keys: list[str]) -> None:
    if tokens.size == 0 or int(tokens.max()) < ref.vocab_size:
        return
    row, col = np.argwhere(tokens >= ref.vocab_size)[0]
    raise DataError(
        f"{where} sample {keys[row]} (#{row}) position {col}: token id {int(tokens[row, col])} "
        f">= vocab_size {ref.vocab_size}"
    )


def _check_crc(what: str, sample: dict, crcs: np.ndarray, index: int) -> None:
    if index >= len(crcs):
        raise DataError(f"{what}: no entry in {CRC_MEMBER} ({len(crcs)} entries)")
    actual = sample_crc(sample)
    if actual != int(crcs[index]):
        raise DataError(
            f"{what}: CRC32 mismatch (stored {int(crcs[index]):08x}, read {actual:08x}): its "
            "bytes changed after packing; rebuild or re-copy the shard"
        )
