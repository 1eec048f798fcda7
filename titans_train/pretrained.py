"""An exported model directory: ``model.safetensors`` + ``config.json`` (+ the tokenizer).

Reading one needs torch and safetensors only (no DeepSpeed, no trainer): this is what
``titans-export`` writes and ``load_pretrained`` reads. It lives outside ``models/``, which does no
file I/O. config.json holds the model's maths only (``ModelConfig.to_dict``); how to run it is the
reader's choice (``runtime``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from titans_train.models import ModelConfig, RuntimeConfig, TitansLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "titans-train"
VERSION = 1


def save_pretrained(
    model: TitansLM,
    out_dir: str | Path,
    extra: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the weights (in ``dtype``, on the CPU; shared tensors such as tied embeddings stored
    once) and config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model.to("cpu", dtype), str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    # safetensors creates its file 0600; every other file follows the umask (0644 by default,
    # 0600 under a private umask), so the weights do too.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(out / WEIGHTS_FILE, 0o666 & ~mask)
    config = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def read_config(path: str | Path) -> dict:
    """config.json of an exported directory, checked for format and version."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not an exported titans-train model)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(
            f"{file}: format {config.get('format')!r} version {config.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return config


def model_config(config: dict, where: str | Path) -> ModelConfig:
    """Older exports also stored execution keys (attn_backend, ...): read, not warned about."""
    try:
        return ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad model config ({e})") from e


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, runtime: RuntimeConfig | None = None
) -> TitansLM:
    """The model of an exported directory, in eval mode; errors name the file and the mismatch.
    ``runtime``: how to run it (default: RuntimeConfig(), or what an older export recorded)."""
    cfg = model_config(read_config(path), Path(path) / CONFIG_FILE)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
    model = TitansLM(cfg, runtime)
    try:
        load_model(model, str(weights), strict=True)
    except Exception as e:  # safetensors raises RuntimeError/SafetensorError/OSError
        raise ValueError(f"{weights} does not match {Path(path) / CONFIG_FILE}: {e}") from e
    return model.to(dtype).eval()
