"""A training checkpoint of any ZeRO stage -> the model's full fp32 weights, with clear errors.

Stages 1-3 go through DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights, merged from
every rank's partition). It fails on stage 0 (``TypeError: 'NoneType' object is not
iterable``: there are no optimizer partitions to merge), where the whole module is in
``mp_rank_00_model_states.pt`` under ``module``. Every failure is a ``CheckpointError`` naming
the checkpoint directory and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from titans_train.checkpoint import (
    CheckpointError,
    find_latest,
    follow_latest,
    incomplete_reason,
    load_trainer_state,
)
from titans_train.models import ModelConfig, TitansLM

MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve_checkpoint(spec: str | Path, run: str | Path | None = None) -> Path:
    """A ``step_XXXXXXXX`` directory from: that directory, a ``latest`` file, a run directory or
    its ``checkpoints/`` (newest complete one), or the word ``latest`` with ``run``."""
    if str(spec) == "latest":
        if run is None:
            raise CheckpointError("--checkpoint latest needs --run RUN_DIR (e.g. runs/tiny-mac)")
        spec = Path(run)
    path = follow_latest(Path(spec))
    if path.is_dir() and not (path / "trainer_state.json").exists():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = find_latest(root)
        if found is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        path = found
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {path}")
    reason = incomplete_reason(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} is unusable: {reason}")
    return path


def trainer_config(path: Path) -> dict:
    """The resolved training config stored in the checkpoint."""
    try:
        return load_trainer_state(path)["config"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}/trainer_state.json has no readable config ({e})") from e


def model_config(config: dict, path: Path) -> ModelConfig:
    try:
        return ModelConfig(**config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/trainer_state.json: bad model config ({e})") from e


def _stage(config: dict, path: Path) -> int:
    stage = config.get("zero", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{path}/trainer_state.json: zero.stage {stage!r} is not 0-3")
    return stage


@contextlib.contextmanager
def _weights_only_loads():
    """Every ``torch.load`` inside runs with ``weights_only=True`` (DeepSpeed's zero_to_fp32
    passes ``weights_only=False``), allowing only the three plain DeepSpeed records its optimizer
    files hold: a checkpoint handed to titans-export / titans-eval cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real


def consolidated_weights(path: Path, stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model saved by ZeRO-``stage`` in checkpoint ``path``."""
    try:
        if stage == 0:
            states = torch.load(path / MODEL_STATES, map_location="cpu", weights_only=True)
            weights = states["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # it prints every tensor it merges, and unpickles: make its loads weights-only
            with contextlib.redirect_stdout(io.StringIO()), _weights_only_loads():
                weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), path.name)
    except Exception as e:  # torch.load and zero_to_fp32 raise many kinds on corrupt files
        raise CheckpointError(
            f"cannot read the ZeRO-{stage} weights of {path}: {type(e).__name__}: {e}"
        ) from e
    return {k: v.detach().float().cpu() for k, v in weights.items()}


def check_weights(weights: dict[str, torch.Tensor], model: TitansLM, where: Path) -> None:
    """Same names and shapes as the model built from the stored config, or an error listing
    the differences."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    # In the model's own order (embedding first), which usually names the telling difference.
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [
        f"{k}: checkpoint {list(have[k])} vs config {list(want[k])}"
        for k in want
        if k in have and want[k] != have[k]
    ]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(
            f"{where}: weights do not match the model config in trainer_state.json: "
            + "; ".join(problems[:8])
            + more
        )


def load_checkpoint_model(path: Path) -> TitansLM:
    """The checkpoint's model in fp32, eval mode, without building a DeepSpeed engine."""
    config = trainer_config(path)
    model = TitansLM(model_config(config, path))
    weights = consolidated_weights(path, _stage(config, path))
    if model.cfg.tie_embeddings and "head.weight" not in weights and "embed.weight" in weights:
        weights["head.weight"] = weights["embed.weight"]  # one tensor, saved once
    check_weights(weights, model, path)
    model.load_state_dict(weights, strict=True)
    return model.eval()
