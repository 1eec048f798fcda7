"""Loading a config: an experiment YAML, its presets and ``key=value`` overrides into the typed
``Config`` (config.py), and the cross-field checks (``validate``) that run before anything
starts. Every failure is a ``ConfigError`` naming the file or override and the key."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from titans_train.config import (
    LEGACY_KEYS,
    MIXES,
    PRESET_KINDS,
    Config,
    ConfigError,
    upgrade_legacy,
)
from titans_train.data.manifest import MANIFEST_NAME, is_url
from titans_train.models.config import ModelConfig
from titans_train.models.runtime import RuntimeConfig
from titans_train.tracking import resolve_mode


def _preset_path(kind: str, value: str, experiment: Path) -> Path:
    if value.endswith((".yaml", ".yml")):
        path = Path(value) if Path(value).is_absolute() else experiment.parent / value
        return path if path.exists() else Path(value)
    for folder in (experiment.parent, *experiment.parents):
        candidate = folder / kind / f"{value}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"{experiment}: presets.{kind}={value!r}: no {kind}/{value}.yaml found")


OVERRIDE_RE = re.compile(r"^[+~]?[A-Za-z_][\w.\[\]-]*=")


def override_keys(overrides: list[str]) -> dict[str, str]:
    """key -> the ``key=value`` override that set it; a malformed override is a ConfigError."""
    keys = {}
    for item in overrides:
        if not OVERRIDE_RE.match(item):
            raise ConfigError(
                f"override {item!r}: overrides are key=value (e.g. train.max_steps=10)"
            )
        keys[item.split("=", 1)[0].lstrip("+~")] = item
    return keys


def _load_yaml(path: Path):
    """OmegaConf.load with a YAML syntax error reported in one line naming the file."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None


def _upgrade_node(node, where: str):
    """upgrade_legacy for an OmegaConf node (interpolations stay unresolved)."""
    if not isinstance(node, DictConfig):
        return node
    return OmegaConf.create(upgrade_legacy(OmegaConf.to_container(node), where))


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model preset YAML plus ``key=value`` overrides; unknown keys are rejected by name.
    Deprecated execution keys (attn_backend, ...) are warned about and kept in
    ``legacy_runtime``, so ``TitansLM(cfg)`` still runs as they say."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        given = [(_load_yaml(path), str(path)), (OmegaConf.from_dotlist(overrides or []), "")]
        layers = [_upgrade_node(OmegaConf.create({"model": n}), w or "overrides") for n, w in given]
        runtime = {k: v for n in layers for k, v in n.get("runtime", {}).items()}
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), *(n.model for n in layers))
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ConfigError) as e:
        raise ValueError(f"{path}: {e}") from e
    if runtime:
        RuntimeConfig(**runtime)  # a bad value fails here, naming runtime.<key>
        cfg.legacy_runtime = dict(runtime)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Compose and validate the config; raises ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    overrides = list(overrides or [])
    from_cli = override_keys(overrides)
    for (section, key), new in LEGACY_KEYS.items():  # a bad value names the override
        if f"{section}.{key}" in from_cli:
            from_cli.setdefault(f"runtime.{new}", from_cli[f"{section}.{key}"])
    try:
        experiment = _upgrade_node(_load_yaml(path), str(path))
        for item in overrides:  # one at a time, so a bad value names its override
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"override {item!r}: YAML syntax error: {problem}") from None
        cli = _upgrade_node(OmegaConf.from_dotlist(overrides), "the command line")
        presets = dict(experiment.get("presets", {}) or {})
        presets.update(dict(cli.get("presets", {}) or {}))
        merged = OmegaConf.structured(Config)
        for kind, value in presets.items():
            if kind not in PRESET_KINDS:
                raise ConfigError(f"{path}: presets.{kind}: unknown preset kind ({PRESET_KINDS})")
            file = _preset_path(kind, str(value), path)
            preset = _upgrade_node(OmegaConf.create({kind: _load_yaml(file)}), str(file))
            merged = OmegaConf.merge(merged, preset)
        merged = OmegaConf.merge(merged, experiment, cli)
        cfg: Config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as e:
        key, first = getattr(e, "full_key", None), str(e).splitlines()[0]
        if key and key in from_cli:  # the bad value came from the command line
            raise ConfigError(f"override {from_cli[key]!r}: {first}") from e
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{first}") from e
    validate(cfg, path, overrides=overrides)
    window_set = "model.window" in from_cli or "window" in (experiment.get("model") or {})
    if cfg.model.variant == "mac" and window_set:  # presets may set it for the other variants
        warnings.warn(
            f"model.window={cfg.model.window} has no effect on MAC: its attention spans "
            f"one segment (model.segment_len={cfg.model.segment_len})",
            stacklevel=2,
        )
    return cfg


def validate(
    cfg: Config,
    source: str | Path = "config",
    world_size: int | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Cross-field checks. ``world_size`` (known at launch) adds the batch divisibility check.
    A key set by one of ``overrides`` is blamed on that override, not on ``source``."""
    from_cli = override_keys(list(overrides or []))

    def bad(key: str, why: str) -> None:
        cli = from_cli.get(key) or from_cli.get(key.split("[")[0])
        if cli:
            raise ConfigError(f"override {cli!r}: {key}: {why}")
        raise ConfigError(f"{source}: {key}: {why}")

    for key, value in _floats(cfg):
        if not math.isfinite(value):
            bad(key, f"must be a finite number, got {value}")
    _check_shapes(cfg, world_size, bad)
    _check_training(cfg, bad)
    _check_sources(cfg, bad)


def _check_shapes(cfg: Config, world_size: int | None, bad) -> None:
    """Sequence length, windows and batch divisibility."""
    m, t = cfg.model, cfg.train
    for key in ("seq_len", "global_batch", "micro_batch", "max_steps"):
        if getattr(t, key) < 1:  # first: the checks below compare other keys with seq_len
            bad(f"train.{key}", f"{getattr(t, key)} must be >= 1")
    if not 0 <= t.burn_in < t.seq_len:
        bad("train.burn_in", f"{t.burn_in} must be >= 0 and < train.seq_len={t.seq_len}")
    if m.window is not None and m.variant != "mac" and m.window > t.seq_len:
        bad("model.window", f"{m.window} is larger than train.seq_len={t.seq_len}")
    if m.variant == "mac" and m.segment_len > t.seq_len:
        bad("model.segment_len", f"{m.segment_len} is larger than train.seq_len={t.seq_len}")
    if t.global_batch % t.micro_batch:
        bad(
            "train.global_batch",
            f"{t.global_batch} is not divisible by micro_batch={t.micro_batch}",
        )
    if world_size is not None and t.global_batch % (world_size * t.micro_batch):
        bad(
            "train.global_batch",
            f"{t.global_batch} is not divisible by world_size x micro_batch = "
            f"{world_size} x {t.micro_batch}",
        )


def _check_training(cfg: Config, bad) -> None:
    """Optimizer, ZeRO, launch, checkpoint and tracking choices."""
    o, z, c, la = cfg.optim, cfg.zero, cfg.checkpoint, cfg.launch
    if o.schedule not in ("cosine", "wsd", "constant"):
        bad("optim.schedule", f"{o.schedule!r} is not one of cosine, wsd, constant")
    if not 0 <= o.decay_fraction <= 1:
        bad("optim.decay_fraction", "must be in [0, 1]")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        bad("optim.lr", f"need 0 <= min_lr <= lr (lr={o.lr}, min_lr={o.min_lr})")
    if z.stage not in (0, 1, 2, 3):
        bad("zero.stage", f"{z.stage} is not 0, 1, 2 or 3")
    if z.precision not in ("auto", "fp32", "bf16"):
        bad("zero.precision", f"{z.precision!r} is not auto, fp32 or bf16")
    if z.offload_optimizer and z.stage == 0:
        bad("zero.offload_optimizer", "needs zero.stage >= 1")
    for key in ("grad_accum_dtype", "communication_dtype"):
        if getattr(z, key) not in ("fp32", "bf16"):
            bad(f"zero.{key}", f"{getattr(z, key)!r} is not fp32 or bf16")
    if min(la.startup_timeout, la.timeout) <= 0 or la.walltime_margin < 0 or la.walltime_poll <= 0:
        bad("launch", "timeouts and walltime_poll must be > 0, walltime_margin >= 0")
    if c.checksum not in ("auto", "xxh3", "blake2b", "none"):
        bad("checkpoint.checksum", f"{c.checksum!r} is not auto, xxh3, blake2b or none")
    if c.keep_last < 1:
        bad("checkpoint.keep_last", "must be >= 1")
    if c.interval < 0:
        bad("checkpoint.interval", f"{c.interval} must be >= 0 (0 = only at the end)")
    try:
        resolve_mode(cfg.tracking.mode, {})  # here, not once the engine is built
    except ValueError:
        bad("tracking.mode", f"{cfg.tracking.mode!r} is not one of online, offline, disabled")


def _check_sources(cfg: Config, bad) -> None:
    """The checkpoint to resume from and the data manifests exist (local ones); data keys."""
    c = cfg.checkpoint
    if c.resume not in ("auto", "never") and not Path(c.resume).exists():
        bad("checkpoint.resume", f"{c.resume!r} is not auto, never, or an existing checkpoint")
    if not cfg.data.train:
        bad("data.train", "no manifest given")
    if cfg.data.mix not in MIXES:
        bad("data.mix", f"{cfg.data.mix!r} is not one of {', '.join(MIXES)}")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.train):
        bad("data.weights", f"{len(cfg.data.weights)} weights for {len(cfg.data.train)} manifests")
    for i, src in enumerate(cfg.data.train + (cfg.data.val or [])):
        if is_url(src):
            continue  # remote: checked by the loader when it opens it
        p = Path(src)
        if not (p / MANIFEST_NAME).is_file() and not (p.is_file() and p.suffix == ".json"):
            key = f"data.train[{i}]" if i < len(cfg.data.train) else "data.val"
            bad(key, f"no {MANIFEST_NAME} at {src}")


def _floats(obj, prefix: str = ""):
    """(key, value) for every float in the config tree, lists included (e.g. data.weights[1])."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _floats(v, f"{prefix[:-1]}[{i}].")
    elif isinstance(obj, float):
        yield prefix[:-1], obj
