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

from titans_train.checkpoint import STATE, CheckpointError, load_trainer_state
from titans_train.models import TitansLM
from titans_train.pretrained import model_config

MODEL_STATES = "mp_rank_00_model_states.pt"


def trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json; CheckpointError naming it unless it holds a config."""
    try:
        state = load_trainer_state(path)
        if not isinstance(state["config"], dict):
            raise TypeError(f"config is a {type(state['config']).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE} has no readable config ({e})") from e
    return state


def _stage(config: dict, path: Path) -> int:
    stage = config.get("zero", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{path / STATE}: zero.stage {stage!r} is not 0-3")
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


def stage0_master_weights(states: dict, model: TitansLM) -> dict[str, torch.Tensor] | None:
    """A bf16 stage-0 checkpoint's fp32 master weights, or None when it has none (fp32 runs).

    Under bf16 at stage 0 the module holds bf16 copies; DeepSpeed's fp16/bf16 optimizer wrapper
    keeps the fp32 masters per parameter group, in the order of the groups engine.param_groups
    builds (empty groups dropped, as DeepSpeed drops them): one tensor per parameter
    (``fp32_groups``, FP16_UnfusedOptimizer, used with our torch AdamW) or one flat tensor
    (``fp32_groups_flat``, FP16_Optimizer, used with a fused Adam).
    """
    opt = states.get("optimizer") or {}
    per_param = opt.get("fp32_groups") if isinstance(opt, dict) else None
    flats = opt.get("fp32_groups_flat") if isinstance(opt, dict) else None
    if per_param:
        flats = [torch.cat([t.detach().flatten() for t in group]) for group in per_param]
    if not flats:
        return None
    from titans_train.engine import param_groups

    names: dict[int, list[str]] = {}  # tied weights: every name of the one parameter
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    groups = [g["params"] for g in param_groups(model, 0.0) if g["params"]]
    sizes = [sum(p.numel() for p in g) for g in groups]
    if sizes != [f.numel() for f in flats]:
        raise ValueError(
            f"fp32 master weights hold groups of {[f.numel() for f in flats]} elements, the "
            f"model config gives {sizes}"
        )
    weights = dict(states["module"])  # buffers and frozen parameters have no master copy
    for group, flat in zip(groups, flats):
        offset = 0
        for p in group:
            for name in names[id(p)]:
                if name in weights or name == names[id(p)][0]:
                    weights[name] = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
    return weights


def bf16_optimizer_weights(path: Path, model: TitansLM) -> dict[str, torch.Tensor] | None:
    """fp32 weights of a checkpoint written by DeepSpeed's BF16_Optimizer (ZeRO-1 under bf16 with
    fp32 gradient accumulation, engine.py), or None when there are no such files.

    DeepSpeed's zero_to_fp32 refuses these files ("is not a zero checkpoint"). Each rank's file
    holds its slice of every group's flat fp32 partition and, per parameter, where its fragment
    sits in that slice (``param_slice_mappings``); a parameter is its fragments in rank order.
    """
    files = list(path.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not files:
        return None
    files.sort(key=lambda f: int(f.name.split("_")[4]))
    pieces: dict[str, list[torch.Tensor]] = {}
    for file in files:
        with _weights_only_loads():  # fragment_address records are allowed, nothing else
            sd = torch.load(file, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        if "single_partition_of_fp32_groups" not in sd:
            return None  # a ZeRO optimizer's bf16 files: zero_to_fp32 reads those
        groups = zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"])
        for partition, mapping in groups:
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(partition[frag.start : frag.start + frag.numel])
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return {n: torch.cat(parts).view(shapes[n]) for n, parts in pieces.items() if n in shapes}


def consolidated_weights(
    path: Path, stage: int, model: TitansLM | None = None
) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model saved by ZeRO-``stage`` in checkpoint ``path``; at stage
    0 from the fp32 master copy when there is one (bf16 runs; needs ``model`` for its layout)."""
    try:
        if stage == 0:
            with _weights_only_loads():  # stage 0 keeps the optimizer (LossScaler) here
                states = torch.load(path / MODEL_STATES, map_location="cpu", weights_only=True)
            masters = stage0_master_weights(states, model) if model is not None else None
            weights = masters if masters is not None else states["module"]
        elif stage == 1 and model is not None and (found := bf16_optimizer_weights(path, model)):
            weights = found
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
            f"{where}: weights do not match the model config in {STATE}: "
            + "; ".join(problems[:8])
            + more
        )


def load_checkpoint_model(path: Path) -> TitansLM:
    """The checkpoint's model in fp32, eval mode, without building a DeepSpeed engine."""
    config = trainer_state(path)["config"]
    model = TitansLM(model_config(config, path / STATE))
    weights = consolidated_weights(path, _stage(config, path), model)
    if model.cfg.tie_embeddings and "head.weight" not in weights and "embed.weight" in weights:
        weights["head.weight"] = weights["embed.weight"]  # one tensor, saved once
    check_weights(weights, model, path)
    model.load_state_dict(weights, strict=True)
    return model.eval()
