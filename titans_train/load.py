"""What eval, generate and export work on: a ``Checkpoint``, and the model and tokenizer in it.

``open_checkpoint`` takes a training checkpoint (whatever ``checkpoint.resolve_checkpoint``
accepts: a ``step_XXXXXXXX`` directory, a run directory, ``latest``...) or a ``titans-export``
directory, so every tool works on both. Opening reads the small files only; ``model()`` loads
the weights. The tokenizer is the one the training data was tokenized with: the manifest's
identity (``bytes`` is built in; otherwise the ``tokenizer.json`` beside the manifest, checked by
sha256).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from titans_train.checkpoint import STATE, CheckpointError, resolve_checkpoint
from titans_train.consolidate import check_weights, load_checkpoint_model, trainer_state
from titans_train.data.errors import DataError
from titans_train.data.tokenizer import (
    TextTokenizer,
    manifest_identity,
    tokenizer_from_identity,
)
from titans_train.models import ModelConfig, TitansLM
from titans_train.pretrained import CONFIG_FILE, load_pretrained, model_config, read_config
from titans_train.run_dir import RunDir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_placement_args(ap: argparse.ArgumentParser, device: bool = True) -> None:
    """--device and --dtype, shared by titans-eval and titans-generate (export: --dtype)."""
    if device:
        ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the GPU if any)")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and compute dtype")


def resolve_device(spec: str | None) -> torch.device:
    """``spec``, or DeepSpeed's accelerator's device (the GPU when there is one, else CPU)."""
    if spec is None:
        from titans_train.distributed import device

        return device()
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec}: not a device (cpu, cuda, cuda:N, ...)") from None
    if dev.type == "cuda" and not (
        torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    ):
        raise ValueError(f"--device {spec}: no such CUDA device here")
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # other device types: torch raises several kinds when absent
        raise ValueError(f"--device {spec}: not usable here ({type(e).__name__}: {e})") from e
    return dev


def place(model: TitansLM, device: str | None, dtype: str) -> TitansLM:
    """The model on ``device`` in ``dtype`` (the memory's inner loop upcasts to fp32 itself)."""
    return model.to(device=resolve_device(device), dtype=DTYPES[dtype])


@dataclass
class Checkpoint:
    """A training checkpoint or an exported model, read but not loaded: its typed model config,
    step and trainer state, and where its tokenizer comes from."""

    path: Path  # the step_XXXXXXXX or export directory
    model_config: ModelConfig
    step: int | None = None  # None for an export
    state: dict = field(default_factory=dict)  # trainer_state.json; empty for an export
    tokenizer_identity: dict | None = None  # the manifest's "tokenizer" entry
    tokenizer_dir: Path | None = None  # where a tokenizer.json lives (None for bytes)
    exported: bool = False

    @property
    def config(self) -> dict:
        """The resolved (redacted) training config; empty for an export."""
        return self.state.get("config", {})

    @property
    def run_dir(self) -> RunDir | None:
        """The training run this checkpoint belongs to (None for an export)."""
        return None if self.exported else RunDir.of_checkpoint(self.path)

    def model(self) -> TitansLM:
        """The model in fp32 and eval mode on the CPU, without DeepSpeed (loaded on each call)."""
        return load_pretrained(self.path) if self.exported else load_checkpoint_model(self.path)

    def tokenizer(self) -> TextTokenizer:
        if self.tokenizer_identity is None:
            raise CheckpointError(f"{self.path}: no tokenizer recorded; pass --data MANIFEST")
        return tokenizer_from_identity(self.tokenizer_identity, self.tokenizer_dir, self.path)

    def data_manifests(self) -> list[str]:
        data = self.config.get("data", {})
        return list(data.get("val") or data.get("train") or [])


def check_data_matches(checkpoint: Checkpoint, manifest: str) -> None:
    """Refuse data tokenized differently from what the model was trained on."""
    identity, _ = manifest_identity(manifest)
    vocab = checkpoint.model_config.vocab_size
    if identity["vocab_size"] > vocab:
        raise DataError(
            f"{manifest}: tokenizer vocab_size {identity['vocab_size']} exceeds the model's "
            f"{vocab} ({checkpoint.path})"
        )
    mine = checkpoint.tokenizer_identity
    if mine and mine.get("sha256") and mine.get("sha256") != identity.get("sha256"):
        raise DataError(
            f"{manifest}: tokenizer {identity.get('name')!r} (sha256 {identity['sha256'][:12]}) "
            f"is not the one {checkpoint.path} was trained with ({mine.get('name')!r}, "
            f"sha256 {mine['sha256'][:12]})"
        )


def open_checkpoint(
    spec: str | Path, run: str | Path | None = None, data: str | None = None
) -> Checkpoint:
    """A Checkpoint from a training checkpoint or an exported directory. ``data`` (a manifest)
    must use the model's tokenizer; it names the tokenizer when the run's own data is not
    reachable."""
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        config = read_config(path)
        cfg = model_config(config, path / CONFIG_FILE)
        checkpoint = Checkpoint(path, cfg, None, {}, config.get("tokenizer"), path, exported=True)
    else:
        path = resolve_checkpoint(spec, run)
        state = trainer_state(path)
        cfg = model_config(state["config"], path / STATE)
        checkpoint = Checkpoint(path, cfg, state.get("step"), state)
        # The run's own data names the tokenizer; its paths may be relative to another working
        # directory, in which case ``data`` stands in (and suites needing it say so otherwise).
        for manifest in checkpoint.data_manifests()[:1]:
            with contextlib.suppress(DataError):
                checkpoint.tokenizer_identity, checkpoint.tokenizer_dir = manifest_identity(
                    manifest
                )
    if data:
        check_data_matches(checkpoint, data)
        if checkpoint.tokenizer_identity is None:
            checkpoint.tokenizer_identity, checkpoint.tokenizer_dir = manifest_identity(data)
    return checkpoint


def describe(checkpoint: Checkpoint, model: TitansLM) -> dict:
    """JSON-able provenance for results files."""
    return {
        "source": str(checkpoint.path),
        "step": checkpoint.step,
        "variant": checkpoint.model_config.variant,
        "parameters": model.num_params(),
        "tokenizer": (checkpoint.tokenizer_identity or {}).get("name"),
        "wandb_run_id": checkpoint.state.get("wandb_run_id"),
    }


def dump_json(obj: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def initialize_from(model: TitansLM, spec: str) -> str:
    """``checkpoint.init_from``: load the weights of a training checkpoint (or run directory) or
    an export into ``model``, whose config may differ in anything that keeps the shapes (e.g. the
    gates' initial biases, which the loaded weights replace anyway). Returns what was loaded,
    for the log; a CheckpointError names the key, the path and what does not fit."""
    try:
        source = open_checkpoint(spec)
        weights = source.model().state_dict()
        check_weights(weights, model, source.path)
    except (CheckpointError, DataError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint.init_from={spec}: {e}") from e
    model.load_state_dict(weights, strict=True)
    mine, theirs = asdict(model.cfg), asdict(source.model_config)
    changed = [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs.get(k)]
    step = "" if source.step is None else f" (step {source.step})"
    note = f"; model config differs: {', '.join(changed)}" if changed else ""
    return f"checkpoint.init_from: weights of {source.path}{step}{note}"
