"""Forward FLOPs per token, counted per module (a multiply-add is 2 FLOPs).

Attention counts the keys a query really sees (its window, its MAC segment, the persistent
prefix), averaged over a sequence of ``seq_len`` tokens, not the dense T x T a masked kernel may
compute. The memory declares its inner loop: the write-path MLP forward and backward at the chunk
start, the dual-form reads, and the chunk-end updates of M and S. Training costs about 3x forward.
"""

from __future__ import annotations

from .config import ModelConfig


def memory_dims(cfg: ModelConfig) -> list[tuple[int, int]]:
    d = cfg.dim // cfg.mem_heads
    dims = [d] + [cfg.memory_expansion * d] * (cfg.memory_depth - 1) + [d]
    return list(zip(dims[:-1], dims[1:]))


def memory_flops(cfg: ModelConfig, write: bool = True) -> float:
    """One NeuralMemory call per token: projections, conv, gates, inner loop, output gate."""
    D, H, b = cfg.dim, cfg.mem_heads, cfg.chunk_size
    layers = memory_dims(cfg)
    mlp = sum(2 * i * o for i, o in layers)  # one MLP forward, per head
    if not write:  # MAC retrieval: q projection + conv + one read at fixed weights
        return 2 * D * D + 2 * cfg.conv_kernel * D + H * mlp
    n_gates = 3 * H * (cfg.memory_depth if cfg.memory_per_layer_gates else 1)
    proj = 2 * D * 3 * D + 2 * cfg.conv_kernel * 3 * D + 2 * D * n_gates + 2 * 2 * D * D
    inner = (
        mlp  # write-path forward at the chunk-start weights
        + sum(2 * i * o for i, o in layers[1:])  # back-propagated errors
        + 2 * mlp  # reads: h @ W and h @ S per layer
        + sum(2 * b * i + 2 * b * o for i, o in layers)  # dual form: (h . a) and its @ delta
        + 2 * mlp  # chunk-end updates of W and S, amortised per token
    )
    return proj + H * inner


def attention_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Average number of keys (besides the persistent prefix) one query attends to."""
    T = seq_len
    if cfg.variant == "mac":
        C = cfg.segment_len
        full, rest = divmod(T, C)
        causal = (full * C * (C + 1) / 2 + rest * (rest + 1) / 2) / T
        if cfg.mac_retrieval == "per_token":
            return 2 * causal  # segment keys and the retrieved h, both causal
        return causal + cfg.num_memory_tokens
    W = T if cfg.window is None else min(cfg.window, T)
    return (W * (W + 1) / 2 + (T - W) * W) / T


def block_flops(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    D = cfg.dim
    out = {"mlp": 2 * 3 * D * cfg.hidden}
    if cfg.variant != "lmm":
        keys = attention_keys(cfg, seq_len) + cfg.num_persistent
        out["attention_proj"] = 2 * 3 * D * D + 2 * D * D  # qkv and W_o (in MAC/MAG's gate)
        out["attention_scores"] = 2 * 2 * D * keys  # q.k and p.v over the visible keys
    if cfg.variant != "transformer":
        out["memory"] = memory_flops(cfg)
    if cfg.variant == "mac":
        out["memory"] += memory_flops(cfg, write=False)
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by module, summed over blocks, plus the LM head and the total."""
    per_block = block_flops(cfg, seq_len)
    out = {k: v * cfg.depth for k, v in per_block.items()}
    out["head"] = 2 * cfg.dim * cfg.vocab_size
    # MAG, MAL and LMM also write the N_p persistent tokens once per sequence.
    if cfg.variant in ("mag", "mal", "lmm") and cfg.num_persistent:
        out["memory"] *= 1 + cfg.num_persistent / seq_len
    out["total"] = sum(out.values())
    return out
