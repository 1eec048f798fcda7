"""ModelConfig: the one description of a Titans / Transformer++ language model (its maths).

How it runs (attention and memory backends, checkpointing) is ``runtime.RuntimeConfig``. The
execution keys earlier versions kept here (``attn_backend``, ``memory_compile``,
``memory_checkpoint_group``, and ``memory_backend``) are still accepted, with a
DeprecationWarning; ``TitansLM(cfg)`` without a runtime then runs as they say. They are not
fields: ``to_dict`` (config.yaml, exported config.json) never carries them.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, asdict, dataclass

from .runtime import LEGACY_MODEL_KEYS, RuntimeConfig, legacy_runtime_values, warn_legacy

VARIANTS = ("mac", "mag", "mal", "lmm", "transformer")


@dataclass
class ModelConfig:
    variant: str = "mac"  # mac | mag | mal | lmm | transformer
    vocab_size: int = 32000
    dim: int = 768
    depth: int = 12
    heads: int = 16
    # Sliding window: W keys including the query itself (DESIGN 9). None = full causal attention.
    window: int | None = 2048
    segment_len: int = 512  # MAC segment C (attention block); a multiple of chunk_size
    chunk_size: int = 16  # memory chunk b: gradients inside a chunk are taken at its start
    num_persistent: int = 128  # N_p learned tokens per layer, visible to every query
    memory_depth: int = 2  # L_M; 1 = linear memory
    mac_retrieval: str = "per_token"  # per_token | memory_tokens
    num_memory_tokens: int = 256  # N_l learned retrieval queries (mac_retrieval=memory_tokens)
    # What MAC writes into its memory: "output" = the attention output y (the paper), "input" =
    # the segment's normed block input, which cuts the read -> y -> write loop, "output_stopgrad"
    # = y with no gradient from the write back into the read h (docs/results.md)
    mac_write: str = "output"
    memory_heads: int | None = None  # default: heads
    memory_expansion: int = 4
    memory_max_lr: float = 0.1  # theta = max_lr * sigmoid(.); see docs/memory.md "Inner step size"
    memory_per_layer_gates: bool = False
    memory_residual_norm: bool = True  # M(x) = x + LN(MLP(x)); False with depth 1 = delta rule
    # Initial bias of the forgetting gate: alpha = sigmoid(bias) ~ 0.0067 at -5 (docs/memory.md).
    memory_forget_bias: float = -5.0
    conv_kernel: int = 4
    # Width of a causal depthwise conv on the token embeddings, x + conv(x); 0 = none (the paper).
    # Not in the paper: lets a Transformer++ match multi-token keys (models/token_conv.py).
    token_conv: int = 0
    ffn_hidden: int | None = None  # SwiGLU hidden size; default 8/3 * dim rounded up to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Deprecated execution keys (module docstring): init-only, kept in ``self.legacy_runtime``
    # (a plain attribute, not a field: asdict, OmegaConf and to_dict never see it).
    attn_backend: InitVar[str | None] = None
    memory_backend: InitVar[str | None] = None
    memory_compile: InitVar[bool | None] = None
    memory_checkpoint_group: InitVar[int | None] = None

    def __post_init__(self, attn_backend, memory_backend, memory_compile, memory_checkpoint_group):
        given = dict(
            attn_backend=attn_backend,
            memory_backend=memory_backend,
            memory_compile=memory_compile,
            memory_checkpoint_group=memory_checkpoint_group,
        )
        given = {k: v for k, v in given.items() if v is not None}
        self.legacy_runtime: dict = {}
        if given:
            warn_legacy(sorted(given))
            try:
                self.legacy_runtime = legacy_runtime_values(**given)
                RuntimeConfig(**self.legacy_runtime)  # a bad value fails here, not at first use
            except ValueError as e:
                raise ValueError(str(e).replace("runtime.", "model.", 1)) from None
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A stored model config (trainer_state.json, an export's config.json). Execution keys that
        earlier versions stored are kept as ``legacy_runtime``, silently: stored data is not code
        to fix. Unknown keys raise TypeError, bad values ValueError, naming the key."""
        d = dict(d)
        legacy = {k: d.pop(k) for k in LEGACY_MODEL_KEYS if k in d}
        cfg = cls(**d)
        cfg.legacy_runtime = legacy_runtime_values(**legacy)
        return cfg

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mem_heads(self) -> int:
        return self.memory_heads or self.heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * -(-(8 * self.dim) // (3 * 64))

    def validate(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"model.{key}={getattr(self, key)!r}: {why}")

        if self.variant not in VARIANTS:
            bad("variant", f"must be one of {', '.join(VARIANTS)}")
        if self.mac_retrieval not in ("per_token", "memory_tokens"):
            bad("mac_retrieval", "must be per_token or memory_tokens")
        if self.mac_write not in ("output", "input", "output_stopgrad"):
            bad(
                "mac_write",
                "must be output (the paper: attention output y), input or output_stopgrad",
            )
        for key in ("vocab_size", "dim", "depth", "heads", "chunk_size", "memory_depth"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.num_persistent < 0:
            bad("num_persistent", "must be >= 0")
        if isinstance(self.token_conv, bool) or self.token_conv < 0:
            bad("token_conv", "must be a width >= 0 (0: no conv on the embeddings)")
        if self.dim % self.heads:
            bad("dim", f"must be divisible by heads={self.heads}")
        if self.head_dim % 2:
            bad("heads", f"head dim {self.head_dim} must be even for RoPE")
        if self.dim % self.mem_heads:
            bad("memory_heads", f"dim={self.dim} must be divisible by it")
        fb = self.memory_forget_bias
        if isinstance(fb, bool) or not isinstance(fb, (int, float)) or not math.isfinite(fb):
            bad("memory_forget_bias", "must be a finite number (alpha = sigmoid(bias) at init)")
        if self.window is not None and self.window < 1:
            bad("window", "must be >= 1 (or null for full attention)")
        if self.window is None and self.variant in ("mag", "mal"):
            bad("window", f"{self.variant} uses sliding-window attention; set a window")
        if self.variant == "mac":
            if self.segment_len < 1 or self.segment_len % self.chunk_size:
                bad("segment_len", f"must be a positive multiple of chunk_size={self.chunk_size}")
            if self.mac_retrieval == "memory_tokens" and self.num_memory_tokens < 1:
                bad("num_memory_tokens", "must be >= 1 for mac_retrieval=memory_tokens")

    def to_dict(self) -> dict:
        """The maths only: the execution keys are not fields."""
        return asdict(self)
