"""ModelConfig: the one description of a Titans / Transformer++ language model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

VARIANTS = ("mac", "mag", "mal", "lmm", "transformer")
BACKENDS = ("auto", "sdpa", "flex", "flash")


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
    memory_heads: int | None = None  # default: heads
    memory_expansion: int = 4
    memory_max_lr: float = 0.1  # theta = max_lr * sigmoid(.); see docs/memory.md "Inner step size"
    memory_per_layer_gates: bool = False
    memory_residual_norm: bool = True  # M(x) = x + LN(MLP(x)); False with depth 1 = delta rule
    # Chunks per activation-checkpoint group inside the memory (0 = off): keeps M and S only at
    # group boundaries and recomputes the rest in backward (4x less peak memory at 4K tokens for
    # one more forward of the inner loop). See docs/memory.md.
    memory_checkpoint_group: int = 16
    # torch.compile the memory's per-chunk step: ~2.5x faster inner loop after a one-time compile
    # (~40 s on CPU, cached in TORCHINDUCTOR_CACHE_DIR). Recommended for long runs and on GPU.
    memory_compile: bool = False
    conv_kernel: int = 4
    ffn_hidden: int | None = None  # SwiGLU hidden size; default 8/3 * dim rounded up to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attn_backend: str = "auto"  # auto | sdpa | flex | flash
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

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
        if self.attn_backend not in BACKENDS:
            bad("attn_backend", f"must be one of {', '.join(BACKENDS)}")
        if self.mac_retrieval not in ("per_token", "memory_tokens"):
            bad("mac_retrieval", "must be per_token or memory_tokens")
        for key in ("vocab_size", "dim", "depth", "heads", "chunk_size", "memory_depth"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("num_persistent", "memory_checkpoint_group"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.dim % self.heads:
            bad("dim", f"must be divisible by heads={self.heads}")
        if self.head_dim % 2:
            bad("heads", f"head dim {self.head_dim} must be even for RoPE")
        if self.dim % self.mem_heads:
            bad("memory_heads", f"dim={self.dim} must be divisible by it")
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
        return asdict(self)


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model preset YAML plus ``key=value`` overrides; unknown keys are rejected by name."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        base = OmegaConf.structured(ModelConfig)
        merged = OmegaConf.merge(
            base, OmegaConf.load(path), OmegaConf.from_dotlist(overrides or [])
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"{path}: {e}") from e
