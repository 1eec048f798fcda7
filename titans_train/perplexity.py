"""Perplexity at context lengths beyond the training length, with the state carried across pieces.

Long contexts come from the packed stream itself. A split's samples are consecutive slices of
one stream (sample i = stream[i(T+1) : (i+1)(T+1)], shard after shard, docs/data.md), so reading
the shards in their stored order and concatenating the samples gives back a contiguous stretch
of the stream: documents in their packed order, each followed by EOS, crossing sample
boundaries as in training. Every length scores the same tokens, the first N+1 of that stretch
cut into windows of L (+1 for the last target); only how much context precedes a token differs.
A window is fed in pieces with the model's state carried, which equals one call over the whole
window (tests/test_models.py), so memory use is bounded by the piece, not L.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from titans_train.data import ShardManifest
from titans_train.data.errors import DataError
from titans_train.data.shard_format import ShardRef, read_shard
from titans_train.models import TitansLM


def stream_tokens(manifest: str, n_tokens: int, split: str = "val", vocab_size: int = 2**32):
    """(tokens, doc_starts, split): the first ``n_tokens`` of a split's packed stream (shards and
    samples in stored order) and where its documents start (bool, the shards' marks). Falls
    back to the train split when the manifest has no ``split``."""
    m = ShardManifest.load(manifest)
    if not m.shards(split):
        split = "train"
    parts, marks, total = [], [], 0
    for shard in m.shards(split):
        ref = ShardRef(
            m.url(shard), shard.name, shard.samples, shard.sha256, m.sample_tokens, m.dtype,
            vocab_size,
        )  # fmt: skip
        data = read_shard(ref)
        rows = data.tokens.reshape(-1)
        bits = np.unpackbits(data.start_bits, axis=1, count=data.tokens.shape[1]).reshape(-1)
        parts.append(rows[: n_tokens - total])
        marks.append(bits[: n_tokens - total].astype(bool))
        total += len(parts[-1])
        if total >= n_tokens:
            return np.concatenate(parts).astype(np.int64), np.concatenate(marks), split
    raise DataError(
        f"{m.location}: split {split!r} holds {total} tokens, fewer than the {n_tokens} needed; "
        "lower --ppl-tokens or the longest --lengths"
    )


def available_tokens(manifest: str, split: str = "val") -> int:
    """Tokens ``stream_tokens`` can read from a split (the train split when there is no such
    split), from the manifest alone."""
    m = ShardManifest.load(manifest)
    shards = m.shards(split) or m.shards("train")
    return sum(s.samples for s in shards) * m.sample_tokens


def windows(stream: np.ndarray, length: int, n_tokens: int) -> torch.Tensor:
    """[n_tokens // length, length + 1] windows whose targets tile stream[1 : n_tokens + 1]."""
    count = n_tokens // length
    idx = np.arange(count)[:, None] * length + np.arange(length + 1)[None, :]
    return torch.from_numpy(stream[idx])


@torch.no_grad()
def stream_logits(
    model: TitansLM, tokens: torch.Tensor, piece: int, doc_starts: torch.Tensor | None = None
) -> Iterator[tuple]:
    """(start, logits of tokens[:, start : start + piece]) with the state carried between;
    with ``doc_starts`` every document restarts the model (``TitansLM.forward``)."""
    state = None
    for a in range(0, tokens.shape[1], piece):
        starts = None if doc_starts is None else doc_starts[:, a : a + piece]
        out = model(tokens[:, a : a + piece], state=state, doc_starts=starts)
        state = out.state
        yield a, out.logits


def model_device(model: TitansLM) -> torch.device:
    """Where the model's weights are: the tensors the evaluators make go there too."""
    return next(model.parameters()).device


def streamed_nll(
    model: TitansLM, batch: torch.Tensor, piece: int, doc_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token NLL of each row of [B, L+1], fed ``piece`` tokens at a time;
    ``doc_starts`` ([B, L+1] bool) restarts the model at every document."""
    batch = batch.to(model_device(model))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if doc_starts is not None:
        doc_starts = doc_starts[:, :-1].to(batch.device)
    total = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for a, logits in stream_logits(model, inputs, piece, doc_starts):
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), targets[:, a : a + piece], reduction="none"
        )
        total += nll.double().sum(1)
    return total


def perplexity(
    model: TitansLM,
    stream: np.ndarray,
    lengths: list[int],
    n_tokens: int,
    piece: int,
    batch_size: int = 4,
    doc_starts: np.ndarray | None = None,
) -> dict[int, dict]:
    """{length: {"ppl", "ppl_low", "ppl_high", "loss", "tokens", "windows"}} over the same
    ``n_tokens`` targets. The 95 % interval treats windows as independent draws of the mean loss
    (normal approximation, exp'd): neighbouring windows share documents, so it is a little narrow.
    With ``doc_starts`` (the stream's marks) no context crosses a document start: a longer
    window then only adds context inside long documents, as the model was trained to use it.
    """
    results = {}
    for length in lengths:
        if length > n_tokens:
            raise ValueError(f"length {length} is longer than the {n_tokens} scored tokens")
        w = windows(stream, length, n_tokens)
        marks = None if doc_starts is None else windows(doc_starts, length, n_tokens)
        nll = torch.cat(
            [
                streamed_nll(
                    model,
                    w[i : i + batch_size],
                    piece,
                    None if marks is None else marks[i : i + batch_size],
                )  # fmt: skip
                for i in range(0, len(w), batch_size)
            ]
        )
        count = w.shape[0] * length
        loss = nll.sum().item() / count
        half = 1.96 * (nll / length).std().item() / math.sqrt(len(nll)) if len(nll) > 1 else 0.0
        results[length] = {
            "ppl": math.exp(min(loss, 50.0)),
            "ppl_low": math.exp(min(loss - half, 50.0)),
            "ppl_high": math.exp(min(loss + half, 50.0)),
            "loss": loss,
            "tokens": count,
            "windows": w.shape[0],
        }
    return results
