"""The one config tree: typed dataclass schemas, YAML composition, ``key=value`` overrides
(loading and the cross-field checks: config_load.py).

An experiment YAML names its presets and overrides what it needs:

    presets: {model: tiny, data: demo, zero: zero2}    # configs/<kind>/<name>.yaml, or a .yaml path
    name: tiny-mac
    train: {seq_len: 256, global_batch: 8, micro_batch: 2, max_steps: 300}

Merge order: schema defaults < presets < experiment < command-line ``key=value``
(``presets.model=mag_170m`` on the command line swaps a preset). Unknown keys and invalid values
are errors that name the key, raised before anything starts.

``runtime`` holds the execution settings (models/runtime.py). Earlier versions kept them as
``model.attn_backend``, ``model.memory_compile``, ``model.memory_checkpoint_group`` and
``zero.activation_checkpointing``: those keys still load, with a FutureWarning (a warning users
see by default), and land in ``runtime`` (``upgrade_legacy``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from titans_train.models.config import ModelConfig
from titans_train.models.runtime import RuntimeConfig
from titans_train.tracking import TrackingConfig, scrub_secrets

PRESET_KINDS = ("model", "data", "zero")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # manifest dirs, paths or URLs
    weights: list[float] | None = None  # mixing weights, one per manifest
    val: list[str] | None = None  # default: the val split of the train manifests
    seed: int = 0  # the data order is a pure function of (seed, epoch, position)
    num_workers: int = 0
    interleave: int = 8  # shards read round-robin; keep it a multiple of the world size
    # How an epoch orders the shards of several sources (docs/data.md, "Mixing"): stratified
    # (each source spread evenly) | shuffled (uniform, the order before 2026-12-02) | auto: the
    # checkpoint's on resume (shuffled for one saved before the key existed), else stratified.
    mix: str = "auto"
    verify: bool = False  # re-hash shards against the manifest while reading
    # Packed documents restart memory, conv, attention and positions at every document start
    # (docs/memory.md, "Documents"). Changes the maths, so resume protects it.
    document_masking: bool = True

    def build_loader(self, train: TrainConfig, vocab_size: int, rank: int, world_size: int):
        """This rank's StreamingLoader over the train split."""
        from titans_train.data import StreamingLoader

        return StreamingLoader(
            self.train, weights=self.weights, **self._common(train, vocab_size, rank, world_size)
        )

    def build_val_loader(self, train: TrainConfig, vocab_size: int, rank: int, world_size: int):
        """One pass over the val split (of ``val``, else of the train manifests)."""
        from titans_train.data import validation_loader

        common = self._common(train, vocab_size, rank, world_size)
        return validation_loader(self.val or self.train, **common)

    def _common(self, train: TrainConfig, vocab_size: int, rank: int, world_size: int) -> dict:
        return dict(
            seq_len=train.seq_len,
            vocab_size=vocab_size,
            global_batch=train.global_batch,
            micro_batch=train.micro_batch,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            num_workers=self.num_workers,
            interleave=self.interleave,
            mix=resolve_mix(self.mix, None),
            verify=self.verify,
            return_doc_starts=self.document_masking,
        )


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant (all after a linear warmup)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays to min_lr

    def build(self, model, clip: float | None = None, offload: bool = False):
        """AdamW over ``model``'s decay / no-decay groups; a float ``clip`` (ZeRO stage 0) makes
        the optimizer clip, keep the norm and skip non-finite steps (engine.build_optimizer)."""
        from titans_train.engine import build_optimizer

        return build_optimizer(self, model, clip, offload)

    def lr_schedule(self, max_steps: int):
        """The learning rate of optimizer step s (0-based): ``lr_at(s, self, max_steps)``."""
        from titans_train.engine import lr_at

        return lambda step: lr_at(step, self, max_steps)


@dataclass
class ZeroConfig:
    stage: int = 2
    offload_optimizer: bool = (
        False  # ZeRO-Offload: optimizer state in CPU memory (DeepSpeedCPUAdam)
    )
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    param_persistence_threshold: int | None = None  # ZeRO-3: params smaller than this stay whole
    # Under bf16: dtype of accumulated gradients and of their all-reduce/reduce-scatter (engine.py)
    grad_accum_dtype: str = "fp32"  # fp32 | bf16 (stage 0 always accumulates in bf16)
    communication_dtype: str = "fp32"  # fp32 | bf16

    @property
    def clip_in_optimizer(self) -> bool:
        """Who clips: stage 0 in our AdamW (which keeps the norm), ZeRO over its partitions."""
        return self.stage == 0

    def build_engine(
        self, model, optim: OptimConfig, train: TrainConfig, world_size: int, universal=False
    ):
        """(engine, optimizer, scheduler) from deepspeed.initialize (engine.py)."""
        from titans_train.engine import build_engine

        return build_engine(self, model, optim, train, world_size, universal)


@dataclass
class TrainConfig:
    seq_len: int = 1024
    # Tokens at the start of each row run without gradient and without loss: the state the rest
    # is trained from (a used memory, not an empty one; docs/training.md, Burn-in).
    burn_in: int = 0
    global_batch: int = 8  # sequences per optimizer step, all ranks and micro-batches
    micro_batch: int = 1  # sequences per rank per forward
    max_steps: int = 1000
    max_tokens: int | None = None  # stop earlier once this many tokens were trained on
    seed: int = 0  # model init and torch RNG
    eval_interval: int = 100  # 0 = never
    eval_batches: int = 8  # validation steps per evaluation; 0 = the whole val split
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    peak_tflops: float | None = None  # per device, for MFU; None = known GPU table / measured CPU
    tf32: bool = False  # fp32 matmuls (memory inner loop) in TF32 on Ampere+ (docs/devices.md)


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps; 0 = only at the end
    keep_last: int = 3
    keep_every: int | None = None  # also keep every checkpoint whose step is a multiple of this
    resume: str = "auto"  # auto | never | PATH (a step_XXXXXXXX directory)
    force: bool = False  # resume even when the model or data config changed
    # A new run starts from these weights (another run's checkpoint, its run directory, or a
    # titans-export directory): fine-tuning, curricula. Optimizer, step, data and RNG start
    # fresh; a run that has its own checkpoint resumes from that instead.
    init_from: str | None = None
    checksum: str = "auto"  # per file in COMPLETE: auto (xxh3, else blake2b)|xxh3|blake2b|none
    private: bool = False  # run directory 0700, files 0600 (umask 077 for the whole process)
    break_lock: bool = False  # take the run-directory lock even if another host's run holds it


@dataclass
class LaunchConfig:
    """How the run behaves under a launcher and a scheduler (docs/launch.md)."""

    # Collective timeout (s) until `timeout_after_steps` steps of this attempt are done: imports,
    # JIT builds, compiles and checkpoint loads on a busy cluster. Checkpoint saves use it too.
    startup_timeout: float = 1800.0
    timeout: float = 600.0  # afterwards: a rank that stops answering fails the run this fast
    timeout_after_steps: int = 2
    # Stop and checkpoint this long (s) before the SLURM allocation ends; 0 = no wall-time guard.
    walltime_margin: float = 300.0
    walltime_poll: float = 60.0  # s between reads of the end time (scontrol update can move it)

    def build_preemption(self, rank: int):
        """Signal handlers and the wall-time guard; build it before the slow start-up, so that a
        signal arriving while DeepSpeed initialises is kept."""
        from titans_train.preemption import Preemption

        return Preemption(rank, self.walltime_margin, self.walltime_poll)


@dataclass
class DebugConfig:
    """Test hooks; never needed in a real run."""

    nan_loss_at_steps: list[int] = field(default_factory=list)  # poison the loss at these steps
    kill_after_step: int | None = (
        None  # SIGKILL every rank once this step's checkpoint is committed
    )
    hang_at_step: int | None = None  # rank `hang_rank` stops responding in this step (data phase)
    hang_rank: int = 0
    record_samples: bool = False  # every rank appends its sample ids to <run>/samples.jsonl
    enospc_at_step: int | None = None  # this step's checkpoint save fails with ENOSPC


@dataclass
class Config:
    name: str = "run"
    run_dir: str | None = None  # default runs/<name>
    presets: dict[str, str] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        """``Config(model=ModelConfig(attn_backend=...))`` (deprecated keys, already warned about
        by ModelConfig): the values move to ``runtime`` unless it says otherwise."""
        legacy, self.model.legacy_runtime = self.model.legacy_runtime, {}
        default = RuntimeConfig()
        for key, value in legacy.items():
            mine = getattr(self.runtime, key)
            if mine != getattr(default, key) and mine != value:
                raise ConfigError(f"model.{key}={value!r} (deprecated) and runtime.{key}={mine!r}")
            if mine != value:
                self.runtime = dataclasses.replace(self.runtime, **{key: value})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name)


class ConfigError(ValueError):
    """A bad config: the message names the file and the key."""


# Execution keys of earlier versions: (section, key) -> the runtime key they became.
LEGACY_KEYS = {
    ("model", "attn_backend"): "attn_backend",
    ("model", "memory_backend"): "memory_backend",
    ("model", "memory_compile"): "memory_backend",  # true -> compile, false -> eager
    ("model", "memory_checkpoint_group"): "memory_checkpoint_group",
    ("zero", "activation_checkpointing"): "activation_checkpointing",
}


# Keys added after runs were saved without them, with the value that reproduces what those runs
# did. Only stored configs get them: a config file without the key gets the current default.
STORED_DEFAULTS = {("data", "document_masking"): False, ("data", "mix"): "shuffled"}
MIXES = ("auto", "stratified", "shuffled")


def resolve_mix(mix: str, stored: dict | None) -> str:
    """``data.mix`` as a run uses it. ``auto`` follows the checkpoint resumed from (its stored
    config ``stored``; ``shuffled`` if it predates the key), so a resume keeps its order whatever
    the default; a new run (``stored`` None) gets ``stratified``. Other values stand."""
    if mix != "auto":
        return mix
    if stored is None:
        return "stratified"
    return upgrade_stored(stored)["data"]["mix"]


def upgrade_stored(tree: dict) -> dict:
    """A stored config (trainer_state.json) as this version reads it: legacy keys moved, keys
    added since filled with the behaviour the run had (``STORED_DEFAULTS``)."""
    tree = upgrade_legacy(tree)
    for (section, key), value in STORED_DEFAULTS.items():
        part = tree.get(section)
        if isinstance(part, dict) and key not in part:
            tree[section] = {**part, key: value}
    return tree


def upgrade_legacy(tree: dict, where: str | None = None) -> dict:
    """``tree`` (a config as a dict, e.g. a stored trainer_state.json config) with the keys of
    LEGACY_KEYS moved into ``runtime``. With ``where`` (a file, "the command line"), each moved key
    is warned about by name; stored configs are upgraded silently."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for (section, key), new in LEGACY_KEYS.items():
        part = tree.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part.pop(key)
        if key == "memory_compile" and isinstance(value, bool):
            value = "compile" if value else "eager"
        runtime = tree.setdefault("runtime", {})
        if not isinstance(runtime, dict):
            runtime = tree["runtime"] = dict(runtime)
        if new in runtime and runtime[new] != value:
            raise ConfigError(
                f"{where or 'config'}: {section}.{key}={value!r} (deprecated) contradicts "
                f"runtime.{new}={runtime[new]!r}; set runtime.{new} alone"
            )
        runtime[new] = value
        if where is not None:
            warnings.warn(
                f"{where}: {section}.{key} is deprecated (an execution setting); "
                f"use runtime.{new}" + (f"={value}" if key == "memory_compile" else ""),
                FutureWarning,
                stacklevel=3,
            )
    return tree


def public_dict(cfg: Config) -> dict:
    """The config as every writer records it (config.yaml, trainer_state.json, the log, W&B):
    credentials redacted by tracking.scrub_secrets, the one rule."""
    return scrub_secrets(to_dict(cfg))


def public_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(public_dict(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
