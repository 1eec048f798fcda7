"""`titans-train describe MODEL.yaml [key=value ...]`: parameters and FLOPs of a model preset."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from titans_train.config_load import load_model_config
from titans_train.models import ModelConfig, TitansLM
from titans_train.models.flops import flops_per_token


def nominal_size(path: str | Path) -> float | None:
    """The size a preset file name promises: mac_340m.yaml -> 340e6, mag_1.3b.yaml -> 1.3e9."""
    m = re.search(r"_(\d+(?:\.\d+)?)([mb])\.ya?ml$", str(path).lower())
    if not m:
        return None
    return float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by top-level part, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = TitansLM(cfg)
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = name.split(".")[0] if not name.startswith("blocks.") else name.split(".")[2]
        parts[key] = parts.get(key, 0) + p.numel()
    parts["total"] = model.num_params()
    parts["non_embedding"] = model.num_params(non_embedding=True)
    return parts


def describe(path: str, overrides: list[str], seq_len: int) -> str:
    cfg = load_model_config(path, overrides)
    params = count_params(cfg)
    flops = flops_per_token(cfg, seq_len)
    shape = f"{cfg.variant}, {cfg.depth} blocks x {cfg.dim}, {cfg.heads} heads"
    if cfg.variant != "lmm":
        shape += (
            f", segment {cfg.segment_len}" if cfg.variant == "mac" else f", window {cfg.window}"
        )
    if cfg.variant != "transformer":
        shape += f", chunk {cfg.chunk_size}, memory depth {cfg.memory_depth}"
    lines = [
        f"{path}: {shape}, N_p {cfg.num_persistent}",
        f"parameters: {params['total'] / 1e6:,.1f}M total, "
        f"{params['non_embedding'] / 1e6:,.1f}M without the embedding",
    ]
    nominal = nominal_size(path)
    if nominal:
        lines.append(f"nominal size {nominal / 1e6:,.0f}M: {params['total'] / nominal - 1:+.1%}")
    by_part = ", ".join(
        f"{k} {v / 1e6:.2f}M" for k, v in params.items() if k not in ("total", "non_embedding")
    )
    lines.append(f"by part: {by_part}")
    lines.append(
        f"FLOPs per token at seq_len {seq_len}: forward {flops['total'] / 1e9:.3f} G, "
        f"training (3x) {3 * flops['total'] / 1e9:.3f} G"
    )
    lines.append(
        "  by module (forward): "
        + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in flops.items() if k != "total")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "titans-train describe") -> None:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Print the parameter count and FLOPs per token of a model config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("config", help="model YAML, e.g. configs/model/mac_340m.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of model fields")
    ap.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs")
    args = ap.parse_args(argv)
    try:
        print(describe(args.config, args.overrides, args.seq_len))
    except (OSError, ValueError) as e:  # a missing file, a bad key or value (named in e)
        print(f"{prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
