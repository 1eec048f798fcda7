"""Packed documents in the memory's token stream (docs/memory.md, "Documents"): where every token
goes so that each document starts at a chunk boundary, as if it were run alone.

A call's tokens [B, T] are laid out per row on a stream of slots [B, S]. The document a row
continues from an earlier call keeps its chunk phase: its r buffered tokens (written, not yet
committed) take slots 0..r-1 and its new tokens follow. Every document that starts in the call
starts on the next chunk boundary, with the block's persistent tokens P (if any) first, as the
memory of a document run alone sees P || x. The gap after a document's last token is padding,
in a chunk that is never committed; the next chunk resets the memory to M_0. Everything is
computed with tensor ops: no Python loop over documents or rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StreamLayout:
    slot: Tensor  # [B, T] stream slot of every token
    doc: Tensor  # [B, S] document of every slot: 0 = the continued one, -1 = padding
    prefix_index: Tensor  # [B, S] which persistent token a slot holds, -1 if none
    buffered: Tensor  # [B, S] bool: slot holds one of the state's buffered tokens
    reset: Tensor  # [B, chunks] bool: a document starts at the chunk's first slot
    commit: Tensor  # [B, chunks] bool: False for a row's unfinished tail and its padding
    end: Tensor  # [B] one past the last used slot of the row
    tail: Tensor  # [B] slots of the row's last document after its last chunk boundary
    doc_pos: Tensor  # [B] stream tokens of the row's last document so far (P included)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return x.cumsum(1) - x


def stream_layout(starts: Tensor, doc_pos: Tensor, prefix: int, chunk: int) -> StreamLayout:
    """Layout of one call. starts: [B, T] bool, True where a document starts (in the call's
    coordinates); doc_pos: [B] stream tokens the continued document had before the call."""
    B, T = starts.shape
    dev = starts.device
    did = starts.long().cumsum(1)  # document of every token; 0 = continued from the state
    cnt = torch.zeros(B, T + 1, dtype=torch.long, device=dev).scatter_add_(
        1, did, torch.ones_like(did)
    )
    j = torch.arange(T + 1, device=dev)
    r = doc_pos % chunk
    offset = torch.where(j == 0, r[:, None], prefix)  # slots before a document's first token
    used = torch.where(cnt > 0, cnt + offset, 0)
    alloc = (used + chunk - 1) // chunk * chunk
    first_slot = _exclusive_cumsum(alloc)  # chunk-aligned start of every document
    first_token = _exclusive_cumsum(cnt)
    t = torch.arange(T, device=dev)
    slot = (first_slot + offset - first_token).gather(1, did) + t

    last = did[:, -1]
    used_last = used.gather(1, last[:, None])[:, 0]
    end = first_slot.gather(1, last[:, None])[:, 0] + used_last
    S = int(end.max())
    doc = torch.full((B, S + 1), -1, dtype=torch.long, device=dev)  # slot S: a dump for masked
    doc.scatter_(1, slot, did)
    prefix_index = torch.full_like(doc, -1)
    if prefix:
        i = torch.arange(prefix, device=dev)
        p_slot = torch.where(starts[..., None], slot[..., None] - prefix + i, S)  # [B, T, P]
        prefix_index.scatter_(1, p_slot.flatten(1), i.expand(B, T, prefix).flatten(1))
        doc.scatter_(1, p_slot.flatten(1), did[..., None].expand(B, T, prefix).flatten(1))
    s = torch.arange(S + 1, device=dev)
    buffered = (s < r[:, None]) & (cnt[:, :1] > 0)
    doc = torch.where(buffered, 0, doc)
    doc, prefix_index, buffered = doc[:, :S], prefix_index[:, :S], buffered[:, :S]

    chunks = -(-S // chunk)
    starts_at = torch.where(starts, (slot - prefix) // chunk, chunks)
    reset = torch.zeros(B, chunks + 1, dtype=torch.bool, device=dev)
    reset.scatter_(1, starts_at, torch.ones_like(starts))
    pad = torch.full((B, chunks * chunk - S), -1, dtype=torch.long, device=dev)
    commit = (torch.cat([doc, pad], 1).view(B, chunks, chunk) >= 0).all(-1)
    reset = reset[:, :chunks]  # the last column took the masked scatters
    commit[:, :-1] |= reset[:, 1:]  # a tail the next chunk resets anyway: commit it, no select
    tail = used_last % chunk
    doc_pos = torch.where(last == 0, doc_pos + cnt[:, 0], used_last)
    return StreamLayout(
        slot, doc, prefix_index, buffered, reset[:, :chunks], commit, end, tail, doc_pos
    )


def scatter_slots(stream: Tensor, values: Tensor, slot: Tensor) -> Tensor:
    """stream [R, S, C] with values [R, T, C] written at slots [R, T] (out of place, so autograd
    carries gradients to both)."""
    return stream.scatter(1, slot[..., None].expand(*slot.shape, stream.shape[-1]), values)


def gather_slots(stream: Tensor, slot: Tensor) -> Tensor:
    """stream [R, S, C] read at slots [R, T] -> [R, T, C]."""
    return stream.gather(1, slot[..., None].expand(*slot.shape, stream.shape[-1]))


def doc_causal_conv(u: Tensor, doc: Tensor, weight: Tensor) -> Tensor:
    """Depthwise causal conv that never reaches into another document.

    u: [B, K-1+S, C] (the first K-1 slots: the continued document's tail), doc: [B, K-1+S],
    weight [C, 1, K]. Returns [B, S, C]: the conv at the last S slots, each term kept only when
    its input slot belongs to the output's document (K shifted multiply-adds, as ``causal_conv``).
    """
    K = weight.shape[-1]
    S = u.shape[1] - (K - 1)
    w = weight[:, 0].t().to(u.dtype)  # [K, C]
    here = doc[:, K - 1 :]
    y = u[:, :S] * w[0] * (doc[:, :S] == here)[..., None]
    for j in range(1, K):
        y = y + u[:, j : j + S] * w[j] * (doc[:, j : j + S] == here)[..., None]
    return y
