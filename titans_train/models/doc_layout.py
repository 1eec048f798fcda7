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
import torch.nn.functional as F
from torch import Tensor


@dataclass
class StreamLayout:
    slot: Tensor  # [B, T] stream slot of every token (S for a token that is not valid)
    doc: Tensor  # [B, S] document of every slot: 0 = the continued one, -1 = padding
    prefix_index: Tensor  # [B, S] which persistent token a slot holds, -1 if none
    buffered: Tensor  # [B, S] bool: slot holds one of the state's buffered tokens
    continues: Tensor  # [B] bool: the row goes on with the state's document
    first_slot: Tensor  # [B, T + 1] first slot of every document (P included), by document id
    reset: Tensor  # [B, chunks] bool: a document starts at the chunk's first slot
    commit: Tensor  # [B, chunks] bool: False for a row's unfinished tail and its padding
    end: Tensor  # [B] one past the last used slot of the row
    tail: Tensor  # [B] slots of the row's last document after its last chunk boundary
    doc_pos: Tensor  # [B] stream tokens of the row's last document so far (P included)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return x.cumsum(1) - x


def stream_layout(
    starts: Tensor, doc_pos: Tensor, prefix: int, chunk: int, valid: Tensor | None = None
) -> StreamLayout:
    """Layout of one call. starts: [B, T] bool, True where a document starts (in the call's
    coordinates); doc_pos: [B] stream tokens the continued document had before the call; valid:
    [B, T] bool, the tokens that exist (others get no slot: their ``slot`` is S, one past the end).
    """
    B, T = starts.shape
    dev = starts.device
    valid = torch.ones_like(starts) if valid is None else valid
    starts = starts & valid
    did = starts.long().cumsum(1)  # document of every token; 0 = continued from the state
    cnt = torch.zeros(B, T + 1, dtype=torch.long, device=dev).scatter_add_(1, did, valid.long())
    continues = (cnt[:, 0] > 0) | ~starts.any(1)  # the state's document goes on in this call
    j = torch.arange(T + 1, device=dev)
    r = doc_pos % chunk
    offset = torch.where(j == 0, r[:, None], prefix)  # slots before a document's first token
    used = torch.where((cnt > 0) | ((j == 0) & continues[:, None]), cnt + offset, 0)
    alloc = (used + chunk - 1) // chunk * chunk
    first_slot = _exclusive_cumsum(alloc)  # chunk-aligned start of every document
    first_token = _exclusive_cumsum(cnt)
    rank = valid.long().cumsum(1) - 1  # index among the row's valid tokens
    slot = (first_slot + offset - first_token).gather(1, did) + rank

    last = did[:, -1]
    used_last = used.gather(1, last[:, None])[:, 0]
    end = first_slot.gather(1, last[:, None])[:, 0] + used_last
    S = max(int(end.max()), 1)  # a call of padding only (a MAC grid padded for other ranks)
    slot = torch.where(valid, slot, S)
    doc = torch.full((B, S + 1), -1, dtype=torch.long, device=dev)  # slot S: a dump for masked
    doc.scatter_(1, slot, did)
    prefix_index = torch.full_like(doc, -1)
    if prefix:
        i = torch.arange(prefix, device=dev)
        p_slot = torch.where(starts[..., None], slot[..., None] - prefix + i, S)  # [B, T, P]
        prefix_index.scatter_(1, p_slot.flatten(1), i.expand(B, T, prefix).flatten(1))
        doc.scatter_(1, p_slot.flatten(1), did[..., None].expand(B, T, prefix).flatten(1))
    s = torch.arange(S + 1, device=dev)
    buffered = (s < r[:, None]) & continues[:, None]
    doc = torch.where(buffered, 0, doc)
    doc, prefix_index, buffered = doc[:, :S], prefix_index[:, :S], buffered[:, :S]

    chunks = -(-S // chunk)
    starts_at = torch.where(starts, (slot - prefix) // chunk, chunks)
    reset = torch.zeros(B, chunks + 1, dtype=torch.bool, device=dev)
    reset.scatter_(1, starts_at, torch.ones_like(starts))
    reset = reset[:, :chunks]  # the last column took the masked scatters
    pad = torch.full((B, chunks * chunk - S), -1, dtype=torch.long, device=dev)
    commit = (torch.cat([doc, pad], 1).view(B, chunks, chunk) >= 0).all(-1)
    commit[:, :-1] |= reset[:, 1:]  # a tail the next chunk resets anyway: commit it, no select
    tail = used_last % chunk
    doc_pos = torch.where(last == 0, doc_pos + cnt[:, 0], used_last)
    return StreamLayout(
        slot, doc, prefix_index, buffered, continues, first_slot, reset, commit, end, tail, doc_pos
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


def conv_on_stream(
    base: Tensor, doc: Tensor, tail: Tensor, first: Tensor, continues: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The causal conv over a stream. base: [B, S, C] inputs at their slots, doc: [B, S];
    tail: [B, K-1, C], the continued document's last K-1 inputs, which precede slot ``first`` [B]
    in rows that continue (``continues`` [B]). Returns (output [B, S, C], inputs and documents
    with the K-1 slots before the stream, for ``conv_tail_at``)."""
    K = weight.shape[-1]
    at = (first * continues)[:, None] + torch.arange(K - 1, device=base.device)
    keep = continues[:, None, None].to(base.dtype)
    u = scatter_slots(torch.cat([torch.zeros_like(tail), base], 1), tail.to(base.dtype) * keep, at)
    d = torch.cat([doc.new_full((doc.shape[0], K - 1), -1), doc], 1)
    d = d.scatter(1, at, torch.where(continues, 0, -1)[:, None].expand_as(at))
    return doc_causal_conv(u, d, weight), u, d


def conv_tail_at(u: Tensor, d: Tensor, end: Tensor, doc: Tensor, kernel: int) -> Tensor:
    """The kernel-1 conv inputs before slot ``end`` [B] that belong to document ``doc`` [B] (zeros
    before it started): the conv tail a later call continues from. u, d from ``conv_on_stream``
    (slot s sits at index s + kernel - 1 there)."""
    at = end[:, None] + torch.arange(kernel - 1, device=u.device)
    same = d.gather(1, at) == doc[:, None]
    return torch.where(same[..., None], gather_slots(u, at), 0)


def place_buffer(buffer: tuple[Tensor, ...] | None, buffered: Tensor, *stream: Tensor) -> list:
    """The state's buffered k, v and gates (post-conv, [G, chunk, .]) put at their slots 0..r-1
    of the streams [G, S, .] (``buffered`` [G, S])."""
    if buffer is None:
        return list(stream)
    S, mask = stream[0].shape[1], buffered[..., None]
    out = []
    for b, t in zip(buffer, stream):
        b = b[:, :S] if b.shape[1] >= S else F.pad(b, (0, 0, 0, S - b.shape[1]))
        out.append(torch.where(mask, b.to(t.dtype), t))
    return out


def document_starts(x: Tensor, fresh: bool, doc_starts: Tensor | None) -> Tensor:
    """[B, T] bool starts for x [B, T, D], checked; with no earlier tokens (``fresh``) a document
    starts at 0."""
    B, T = x.shape[:2]
    starts = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    if doc_starts is not None:
        if tuple(doc_starts.shape) != (B, T):
            raise ValueError(f"doc_starts has shape {tuple(doc_starts.shape)}, expected {(B, T)}")
        starts = doc_starts.to(device=x.device, dtype=torch.bool)
    if fresh:
        starts = starts.clone()
        starts[:, 0] = True
    return starts


def grid_positions(lay: StreamLayout, doc_pos: Tensor, align: int, length: int) -> Tensor:
    """Every grid slot's position inside its document ([B, length]; 0 for padding): RoPE
    restarts at each document (docs/memory.md, "Documents")."""
    doc = F.pad(lay.doc, (0, length - lay.doc.shape[1]), value=-1)
    s = torch.arange(length, device=doc.device)
    first = lay.first_slot.gather(1, doc.clamp(min=0))
    pos = s - first + torch.where(doc == 0, (doc_pos - doc_pos % align)[:, None], 0)
    return torch.where(doc >= 0, pos, 0)


def on_grid(values: Tensor, slot: Tensor, length: int) -> Tensor:
    """Tokens [B, T, C] at their grid slots [B, T] of a zero grid [B, length, C]."""
    grid = values.new_zeros(values.shape[0], length + 1, values.shape[-1])
    return scatter_slots(grid, values, slot.clamp(max=length))[:, :length]


def row_window(t: Tensor, start: Tensor, n: int) -> Tensor:
    """t [B, H, S, d] at slots start_b .. start_b + n - 1 of each row -> [B, H, n, d]."""
    idx = (start[:, None] + torch.arange(n, device=t.device)).clamp(max=t.shape[2] - 1)
    return t.gather(2, idx[:, None, :, None].expand(t.shape[0], t.shape[1], n, t.shape[3]))


def fit(t: Tensor, n: int) -> Tensor:
    """A cache [B, H, c, d] cut or zero-padded to n slots along dim 2."""
    return t[:, :, :n] if t.shape[2] >= n else F.pad(t, (0, 0, 0, n - t.shape[2]))


def pick(per_segment: list[Tensor], index: Tensor) -> Tensor:
    """Row r of segment index[r] from a list of per-segment tensors [R, ...]."""
    stacked = torch.stack(per_segment)  # [n, R, ...]
    idx = index.view(1, -1, *([1] * (stacked.dim() - 2))).expand(1, *stacked.shape[1:])
    return stacked.gather(0, idx)[0]
