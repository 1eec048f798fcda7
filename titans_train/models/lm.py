"""TitansLM: embeddings, blocks, LM head, loss, and generation with carried state."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .blocks import BlockState, LMMBlock, MAGBlock, MALBlock, TransformerBlock
from .config import ModelConfig
from .layers import RMSNorm
from .mac_block import MACBlock
from .memory import NeuralMemory
from .runtime import RuntimeConfig, runtime_from_legacy
from .threads import OneThreadBackward, one_thread, release, small_on_cpu
from .token_conv import TokenConv

BLOCKS = {
    "mac": MACBlock,
    "mag": MAGBlock,
    "mal": MALBlock,
    "lmm": LMMBlock,
    "transformer": TransformerBlock,
}


@dataclass
class LMState:
    """Per-block streaming state; pass it back to continue the same sequences."""

    blocks: list[BlockState]
    token_tail: Tensor | None = None  # the last K-1 embeddings (token_conv; None without it)

    @property
    def pos(self) -> int:
        return self.blocks[0].pos

    def detach(self) -> LMState:
        tail = None if self.token_tail is None else self.token_tail.detach()
        return LMState([b.detach() for b in self.blocks], tail)


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None
    state: LMState


class TitansLM(nn.Module):
    """``cfg`` is the maths; ``runtime`` how it runs (backends, the memory's checkpoint groups).
    Without a runtime: the deprecated execution keys ``cfg`` was given, else the defaults.
    Activation checkpointing is applied from outside: ``runtime.apply_activation_checkpointing``.
    """

    # Rows that are each one document take the plain path, which computes the same, faster. An
    # execution switch, off in data-parallel training (trainer.same_graph_on_every_rank): ranks
    # whose rows differ in that respect would then run different graphs, so their backwards
    # produce gradients in another order and, under ZeRO-3, gather parameters differently.
    document_shortcut: bool = True
    # MAC lays packed documents out on a grid whose length, and so its number of module calls,
    # depends on where they start. Data-parallel training installs here a max over the ranks
    # (trainer.same_graph_on_every_rank), which pads every rank's grid to one length: ZeRO-3
    # gathers parameters call by call. The model only calls it; it knows nothing of ranks.
    layout_agree: Callable[[int], int] | None = None

    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__()
        self.cfg, self.runtime = cfg, runtime or runtime_from_legacy(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.token_conv = TokenConv(cfg.dim, cfg.token_conv) if cfg.token_conv else None
        self.blocks = nn.ModuleList(
            [BLOCKS[cfg.variant](cfg, self.runtime) for _ in range(cfg.depth)]
        )
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Llama/GPT-2 style: N(0, 0.02); projections into the residual stream (marked by
        ``policy.residual_proj`` where they are made) scaled by depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.depth)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                residual_out = getattr(module, "_residual_proj", False)
                nn.init.normal_(module.weight, std=out_std if residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        for module in self.modules():
            if isinstance(module, NeuralMemory):
                module.reset_parameters(std)  # also restores the gate biases
        for block in self.blocks:
            if block.persistent is not None:
                nn.init.normal_(block.persistent, std=std)
            if getattr(block, "mem_queries", None) is not None:
                nn.init.normal_(block.mem_queries)
        if self.token_conv is not None:
            self.token_conv.reset_parameters()  # zeros: a new model starts as the plain one

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        state: LMState | None = None,
        doc_starts: Tensor | None = None,
    ) -> LMOutput:
        """tokens: [B, T] ids. targets: [B, T] ids (-100 = ignore). Returns logits, loss, state.

        doc_starts: [B, T] bool, True at the first token of each document packed in a row. Every
        block restarts there (memory, conv, attention, positions), so a document gets the logits
        it gets alone. Position 0 starts a document only when marked, or with no state.
        """
        if doc_starts is not None and tuple(doc_starts.shape) != tuple(tokens.shape):
            raise ValueError(
                f"doc_starts has shape {tuple(doc_starts.shape)}, expected {tuple(tokens.shape)}"
            )
        if doc_starts is not None and self.document_shortcut and _one_document(doc_starts, state):
            doc_starts = None  # the plain path computes the same, faster
        grid = self._agreed_grid(tokens, state, doc_starts)
        self._plan_memory_checkpointing(*tokens.shape)
        x = self.embed(tokens)
        tail = None
        if self.token_conv is not None:
            x, tail = self.token_conv(x, state.token_tail if state else None, doc_starts)
        auto_threads = self.runtime.cpu_threads == "auto"
        if auto_threads:
            release()  # a backward that raised kept one thread: give the caller's back
        new_states, small = [], auto_threads and small_on_cpu(x)  # one thread (threads.py)
        with one_thread(small):
            for i, block in enumerate(self.blocks):
                x, s = block(x, None if state is None else state.blocks[i], doc_starts, grid)
                new_states.append(s)
            logits = self.head(self.norm(x))
            if small and logits.requires_grad:
                logits = OneThreadBackward.apply(logits)
            loss = None
            if targets is not None:
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
                )
        return LMOutput(logits, loss, LMState(new_states, tail))

    def _agreed_grid(self, tokens: Tensor, state: LMState | None, doc_starts: Tensor | None) -> int:
        """The documents grid length every rank uses (``layout_agree``; 0: each its own). Every
        block sees the same starts and document positions, so block 0 speaks for all."""
        if doc_starts is None or self.layout_agree is None:
            return 0
        need = self.blocks[0].documents_grid(tokens, state and state.blocks[0], doc_starts)
        return 0 if need is None else self.layout_agree(need)

    def _plan_memory_checkpointing(self, batch: int, tokens: int) -> None:
        """Checkpoint the memories' chunk loops this call only if the states they would keep
        exceed ``runtime.memory_checkpoint_budget_mb``: a memory call cannot decide it (MAC calls
        it per segment). Set on the modules, so a block recomputed in backward decides alike."""
        mems = [m for m in self.modules() if isinstance(m, NeuralMemory)]
        tokens += self.cfg.num_persistent  # written first by MAG/MAL/LMM: an upper bound
        total = sum(m.chunk_state_bytes(batch, tokens) for m in mems)
        active = total > self.runtime.memory_checkpoint_budget_mb * 2**20
        for m in mems:
            m.checkpoint_active = active

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
        prefill_chunk: int | None = None,
    ) -> Tensor:
        """Sample continuations; returns [B, T_prompt + new] (or [T] for a 1-D prompt).

        With the cache, the prompt is consumed in pieces of ``prefill_chunk`` tokens (default: one
        MAC segment or attention window) and each new token costs one step of carried state: a
        window KV cache plus the memory, so prompts may be far longer than the window. Without it
        every step re-runs the whole sequence (the reference the cache is tested against).
        """
        squeeze = prompt_ids.dim() == 1
        ids = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device).manual_seed(seed)
        piece = prefill_chunk or self.cfg.segment_len or 512
        state, logits = None, None
        if use_cache:
            for start in range(0, ids.shape[1], piece):
                out = self(ids[:, start : start + piece], state=state)
                state, logits = out.state, out.logits[:, -1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(ids).logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
            if use_cache:
                out = self(nxt[:, None], state=state)
                state, logits = out.state, out.logits[:, -1]
        return ids[0] if squeeze else ids


def _one_document(doc_starts: Tensor, state: LMState | None) -> bool:
    """True when every row goes on with a single document: no mark after position 0 of a fresh
    sequence, or no mark at all in a sequence that has not seen documents (per-row document
    state, once there is some, needs the document path)."""
    if state is None:
        return not bool(doc_starts[:, 1:].any())
    if any(b.doc_pos is not None for b in state.blocks):
        return False
    return not bool(doc_starts.any())


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row from [B, V] logits: greedy at temperature 0, else top-k / nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
