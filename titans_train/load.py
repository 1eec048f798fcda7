"""What eval, generate and export work on: a model, its tokenizer and where both came from.

``open_model`` takes either a training checkpoint (a ``step_XXXXXXXX`` directory, a run
directory, ``latest``...) or a ``titans-export`` directory, so every tool works on both. The
tokenizer is the one the training data was tokenized with: the manifest's identity (``bytes`` is
built in; otherwise the ``tokenizer.json`` beside the manifest, checked by sha256).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipelines.tokenizer import BYTES, TextTokenizer, load_tokenizer
from titans_train.checkpoint import CheckpointError, load_trainer_state
from titans_train.consolidate import load_checkpoint_model, resolve_checkpoint
from titans_train.data import ShardManifest
from titans_train.data.errors import DataError
from titans_train.models import TitansLM
from titans_train.pretrained import CONFIG_FILE, load_pretrained, read_config

TOKENIZER_FILE = "tokenizer.json"
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
class ModelSource:
    model: TitansLM
    path: Path  # the checkpoint or export directory
    tokenizer_identity: dict | None  # the manifest's "tokenizer" entry
    tokenizer_dir: Path | None  # where a tokenizer.json lives (None for bytes)
    step: int | None = None
    trainer_state: dict = field(default_factory=dict)  # empty for an export

    def tokenizer(self) -> TextTokenizer:
        if self.tokenizer_identity is None:
            raise CheckpointError(f"{self.path}: no tokenizer recorded; pass --data MANIFEST")
        return tokenizer_from_identity(self.tokenizer_identity, self.tokenizer_dir, self.path)

    def data_manifests(self) -> list[str]:
        data = self.trainer_state.get("config", {}).get("data", {})
        return list(data.get("val") or data.get("train") or [])


def tokenizer_from_identity(identity: dict, folder: Path | None, where: Path) -> TextTokenizer:
    if identity.get("kind") == BYTES or identity.get("name") == BYTES:
        return load_tokenizer(BYTES)
    file = None if folder is None else folder / (identity.get("file") or TOKENIZER_FILE)
    if file is None or not file.is_file():
        raise CheckpointError(f"{where}: tokenizer file {file} not found")
    tok = load_tokenizer(str(file), eos_token=identity.get("eos_token"))
    if identity.get("sha256") and tok.sha256 != identity["sha256"]:
        raise CheckpointError(
            f"{file}: sha256 {tok.sha256[:12]} differs from the recorded {identity['sha256'][:12]}"
        )
    return tok


def manifest_tokenizer(manifest: str) -> tuple[dict, Path | None]:
    """The tokenizer identity of a shard manifest, and the folder holding its tokenizer.json."""
    m = ShardManifest.load(manifest)
    folder = None if "://" in m.location else Path(m.location).parent
    return m.data["tokenizer"], folder


def check_data_matches(source: ModelSource, manifest: str) -> None:
    """Refuse data tokenized differently from what the model was trained on."""
    identity, _ = manifest_tokenizer(manifest)
    vocab = source.model.cfg.vocab_size
    if identity["vocab_size"] > vocab:
        raise DataError(
            f"{manifest}: tokenizer vocab_size {identity['vocab_size']} exceeds the model's "
            f"{vocab} ({source.path})"
        )
    mine = source.tokenizer_identity
    if mine and mine.get("sha256") and mine.get("sha256") != identity.get("sha256"):
        raise DataError(
            f"{manifest}: tokenizer {identity.get('name')!r} (sha256 {identity['sha256'][:12]}) "
            f"is not the one {source.path} was trained with ({mine.get('name')!r}, "
            f"sha256 {mine['sha256'][:12]})"
        )


def open_model(spec: str | Path, run: str | Path | None = None, data: str | None = None):
    """A ModelSource from a checkpoint or an exported directory. ``data`` (a manifest) must use
    the model's tokenizer; it names the tokenizer when the run's own data is not reachable."""
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        config = read_config(path)
        source = ModelSource(load_pretrained(path), path, config.get("tokenizer"), path)
    else:
        path = resolve_checkpoint(spec, run)
        state = load_trainer_state(path)
        source = ModelSource(
            load_checkpoint_model(path), path, None, None, state.get("step"), state
        )
        # The run's own data names the tokenizer; its paths may be relative to another working
        # directory, in which case ``data`` stands in (and suites needing it say so otherwise).
        for manifest in source.data_manifests()[:1]:
            with contextlib.suppress(DataError):
                source.tokenizer_identity, source.tokenizer_dir = manifest_tokenizer(manifest)
    if data:
        check_data_matches(source, data)
        if source.tokenizer_identity is None:
            source.tokenizer_identity, source.tokenizer_dir = manifest_tokenizer(data)
    return source


def describe(source: ModelSource) -> dict:
    """JSON-able provenance for results files."""
    cfg = source.model.cfg
    return {
        "source": str(source.path),
        "step": source.step,
        "variant": cfg.variant,
        "parameters": source.model.num_params(),
        "tokenizer": (source.tokenizer_identity or {}).get("name"),
        "wandb_run_id": source.trainer_state.get("wandb_run_id"),
    }


def dump_json(obj: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
