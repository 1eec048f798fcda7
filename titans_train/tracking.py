"""Experiment tracking: one W&B run per training run, continued across preemption and requeue.

Only rank 0 talks to W&B; every other rank gets a no-op `Tracker` that never imports wandb.
The run id lives in the checkpoint, so a requeued job continues the same W&B run, and a job
that died after its last checkpoint rewinds the W&B history to the checkpoint step instead
of having the repeated steps dropped as non-monotonic (wandb #4482). See docs/tracking.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import secrets
import string
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titans_train.run_dir import WANDB

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "titans-train"
REDACTED = "<redacted>"
MODES = ("disabled", "offline", "online")  # most to least restrictive
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's legacy spellings
# wandb reads these itself and would then pick, resume or branch the run on its own (and
# reject our arguments as conflicting); the checkpoint owns the run identity, so they are
# hidden from wandb.init and a warning says so.
_IDENTITY_ENV = ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RESUME_FROM", "WANDB_FORK_FROM")
_ID_ALPHABET = string.ascii_lowercase + string.digits  # what W&B's own ids use


@dataclass
class TrackingConfig:
    """The `tracking:` section of the config. Precedence rules are in docs/tracking.md."""

    project: str | None = None  # None -> WANDB_PROJECT -> "titans-train"
    entity: str | None = None  # None -> WANDB_ENTITY -> your W&B default entity
    name: str | None = None  # None -> WANDB_NAME -> the trainer's run name
    tags: list[str] = field(default_factory=list)  # plus WANDB_TAGS (comma-separated)
    mode: str = "offline"  # online | offline | disabled; see resolve_mode for WANDB_MODE
    dir: str | None = None  # W&B's root dir: files go to <dir>/wandb/; default the run dir
    log_interval: int = 10  # the trainer logs every N optimizer steps


def new_run_id() -> str:
    """A fresh 8-character run id in W&B's alphabet (36^8 ids; a clash is negligible)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def _parse_mode(value: str, source: str) -> str:
    mode = _MODE_ALIASES.get(value.strip().lower(), value.strip().lower())
    if mode not in MODES:
        raise ValueError(f"{source}={value!r}: expected one of {', '.join(MODES)}")
    return mode


def resolve_mode(cfg_mode: str, environ: Mapping[str, str]) -> str:
    """Combine `tracking.mode` with WANDB_MODE.

    WANDB_MODE may always make tracking more restrictive (online -> offline -> disabled):
    an air-gapped node or CI sets it and no config can make such a job reach for the network.
    It may make tracking less restrictive only when the config leaves `mode` at its default.
    """
    mode = _parse_mode(cfg_mode, "tracking.mode")
    env_value = environ.get("WANDB_MODE", "").strip()
    if not env_value:
        return mode
    env_mode = _parse_mode(env_value, "WANDB_MODE")
    if mode == TrackingConfig.mode:  # left at the default
        return env_mode
    return min(mode, env_mode, key=MODES.index)


def resolve_run_settings(
    cfg: TrackingConfig, run_name: str, environ: Mapping[str, str]
) -> dict[str, Any]:
    """project, entity, name, tags, mode for wandb.init: config, then WANDB_* env, then default."""
    env_tags = [t.strip() for t in environ.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {
        "project": cfg.project or environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        "entity": cfg.entity or environ.get("WANDB_ENTITY") or None,
        "name": cfg.name or environ.get("WANDB_NAME") or run_name,
        "tags": list(dict.fromkeys([*cfg.tags, *env_tags])),  # union, order kept, no repeats
        "mode": resolve_mode(cfg.mode, environ),
    }


# Key names that hold credentials. Matched on the last `_`-separated component(s) of the
# normalised key, so `tokens_seen`, `max_tokens` and `tokenizer` are not caught, while
# `api_key`, `apiKey`, `hf_token`, `wandb.api-key` and `db_password` are.
_SECRET_KEY_RE = re.compile(
    r"(?:^|_)(?:api_?key|secret|secrets|secret_?key|password|passwd|credentials?"
    r"|private_?key|access_?key|token|auth|authorization|signature|sig)$"
)
# Tokenizer settings named like `eos_token` hold a vocabulary string, not a credential.
_NOT_SECRET_RE = re.compile(r"(?:^|_)(?:eos|bos|pad|unk|sep|cls|mask)_token$")


def _normalise_key(key: object) -> str:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))  # apiKey -> api_Key
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def is_secret_key(key: object) -> bool:
    """Whether a config or env key name looks like it holds a credential."""
    norm = _normalise_key(key)
    return bool(_SECRET_KEY_RE.search(norm)) and not _NOT_SECRET_RE.search(norm)


# Inside a string value (a `pipe:curl ...` URL, a dotlist override): `name=value` or
# `name: value` where the name looks secret, `Bearer <token>`, and `user:password@` in URLs.
_INLINE_PAIR_RE = re.compile(r"([A-Za-z_][\w.-]*)(=|:\s+)([^\s&;,'\"\]\)]+)")
_BEARER_RE = re.compile(r"\b(bearer|basic|token)(\s+)([^\s'\"]+)", re.IGNORECASE)
_SCHEMES = ("bearer", "basic", "token")  # `Authorization: Bearer <token>`: already handled
_USERINFO_RE = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")


def scrub_text(text: str, env_secrets: Sequence[str] = ()) -> str:
    """`text` with credentials replaced by "<redacted>": the whole string if it holds a secret
    environment value, otherwise each secret part found by pattern (the rest is kept)."""
    if any(secret in text for secret in env_secrets):
        return REDACTED
    text = _USERINFO_RE.sub(rf"\1{REDACTED}@", text)
    text = _BEARER_RE.sub(rf"\1\2{REDACTED}", text)

    def pair(m: re.Match) -> str:
        value = m.group(3)
        if is_secret_key(m.group(1)) and value != REDACTED and value.lower() not in _SCHEMES:
            return f"{m.group(1)}{m.group(2)}{REDACTED}"
        return m.group(0)

    return _INLINE_PAIR_RE.sub(pair, text)


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (WANDB_API_KEY, HF_TOKEN, ...)."""
    environ = os.environ if environ is None else environ
    # Short values would match too much by accident; real keys are long.
    return [v for k, v in environ.items() if is_secret_key(k) and len(v) >= 8]


def scrub_secrets(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of `obj` with credentials replaced by "<redacted>": the one redaction rule, used
    by every place the config is written or printed (config.yaml, trainer_state.json, the log,
    W&B's config and recorded command line).

    Values under secret-looking keys are replaced whole (the key is kept, to show that something
    was set), and so is any string containing the value of a secret-looking environment
    variable. Inside other strings, `name=value` pairs whose name looks secret (`auth=`,
    `token=`, `X-Amz-Signature=`), `Bearer <token>` and URL passwords are replaced, and the rest
    of the string is kept.
    """
    found = env_secrets(environ)

    def scrub(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: REDACTED if is_secret_key(k) else scrub(v) for k, v in value.items()}
        if isinstance(value, str):
            return scrub_text(value, found)
        if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
            return [scrub(v) for v in value]
        return value

    return scrub(obj)


@contextlib.contextmanager
def _redacted_argv() -> Iterator[None]:
    """wandb records sys.argv[1:] as the run's command line (Settings._args, read in
    wandb.init) and uploads it; show it only the redacted form."""
    saved = list(sys.argv)
    sys.argv[1:] = scrub_secrets(saved[1:])
    try:
        yield
    finally:
        sys.argv[:] = saved


_FIRST_KEYS = ("loss", "lr", "grad_norm")  # then the rest, alphabetically
_SI = ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"))


def _format_value(value: Any) -> str:
    if hasattr(value, "item") and not isinstance(value, numbers.Number):
        with contextlib.suppress(Exception):  # 0-d torch tensors and numpy arrays
            value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral) and abs(value) < 10_000:
        return str(int(value))  # steps, counts
    x = float(value)
    if not math.isfinite(x) or x == 0:
        return "0" if x == 0 else str(x)  # 0, nan, inf, -inf
    if abs(x) >= 10_000:  # throughput, tokens, FLOPs: 3 significant digits and a suffix
        for scale, suffix in _SI:
            if abs(x) / scale < 999.5 or suffix == "T":  # 999.5k would print as 1e+03k
                return f"{x / scale:.3g}{suffix}"
    if abs(x) < 1e-3:
        return f"{x:.2e}"  # learning rates: 3.00e-04
    return f"{x:.4g}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """One short line for the trainer's log: `loss=2.346 lr=3.00e-04 grad_norm=0.81 mfu=0.4123`.

    Order is fixed: loss, lr and grad_norm first (also under a prefix such as `train/`),
    then the other keys alphabetically. Large numbers get SI suffixes (`tokens=1.23M`).
    """

    def order(key: str) -> tuple[int, str]:
        last = key.rsplit("/", 1)[-1]
        rank = _FIRST_KEYS.index(last) if last in _FIRST_KEYS else len(_FIRST_KEYS)
        return rank, key

    return " ".join(f"{k}={_format_value(metrics[k])}" for k in sorted(metrics, key=order))


def branch_args(run_id: str | None, resume_step: int | None, last_logged: int | None) -> dict:
    """How wandb.init should attach to the run: new, continued, or rewound.

    `last_logged` is the highest step this run dir has sent to W&B (None if unknown).
    Rewinding only when we know steps beyond the checkpoint were logged keeps ordinary
    requeues (checkpoint saved at the preemption signal) off W&B's rewind path, which
    archives a copy of the run each time and is not available on every W&B server.
    """
    if run_id is None:
        return {}
    if resume_step is not None and last_logged is not None and last_logged > resume_step:
        return {"resume_from": f"{run_id}?_step={resume_step}"}
    return {"resume": "allow"}


@contextlib.contextmanager
def _hidden_env(names: Sequence[str]) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    if saved:
        log.warning("ignoring %s: the run id comes from the checkpoint", ", ".join(saved))
    try:
        yield
    finally:
        os.environ.update(saved)


class Tracker:
    """W&B on rank 0; a no-op everywhere else. See docs/tracking.md."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_dir: str | Path,
        run_name: str,
        config: dict,
        rank: int,
        run_id: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        # Only rank 0's id is real; other ranks never use theirs (store rank 0's in checkpoints).
        self.run_id: str = run_id or new_run_id()
        self.run_path: Path | None = None
        self.mode = "disabled"
        self.rewound = False  # True when this segment rewound the W&B history
        self._run: Any = None
        self._marker: Path | None = None
        self._last_logged: int | None = None
        if rank != 0:
            return
        settings = resolve_run_settings(cfg, run_name, os.environ)
        self.mode = settings["mode"]
        if self.mode == "disabled":
            return  # no wandb import, no files
        root = Path(cfg.dir) if cfg.dir else Path(run_dir)
        # The highest step this run dir has logged for the run, written before each log call
        # so that it never lags behind what W&B has.
        self._marker = root / WANDB / f"titans-last-step-{self.run_id}.json"
        branch = branch_args(run_id, resume_step, _read_marker(self._marker))
        self._run = self._init_run(settings, root, scrub_secrets(config), branch)
        if self.rewound:
            self._write_marker(resume_step)  # W&B history now ends at the checkpoint
        self.run_path = Path(self._run.settings.sync_dir)
        log.info("W&B run %s (%s) in %s", self.run_id, self.mode, self.run_path)

    def _init_run(self, settings: dict, root: Path, config: dict, branch: dict) -> Any:
        import wandb  # only rank 0 with tracking on pays for (and is affected by) wandb

        kwargs = dict(settings, id=self.run_id, dir=str(root), config=config)
        with _hidden_env(_IDENTITY_ENV), _redacted_argv():
            try:
                run = wandb.init(**kwargs, **branch)
                self.rewound = "resume_from" in branch
                return run
            except Exception as err:
                # Offline, resume_from is only recorded, so it cannot fail for server reasons.
                # Online the rewind can be refused (not enabled for the entity, run never
                # synced); training must go on, so continue the run and say what is lost.
                if "resume_from" not in branch or settings["mode"] != "online":
                    raise
                log.warning(
                    "W&B refused to rewind run %s (%s); continuing it with resume='allow': "
                    "steps W&B already has beyond the checkpoint keep their old values",
                    self.run_id,
                    err,
                )
                return wandb.init(**kwargs, resume="allow")

    def _write_marker(self, step: int) -> None:
        self._last_logged = step
        if self._marker is None:
            return
        tmp = self._marker.with_suffix(".tmp")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)  # wandb may use <dir>/.wandb instead
            tmp.write_text(json.dumps({"run_id": self.run_id, "last_step": step}))
            os.replace(tmp, self._marker)  # atomic: a crash leaves the old or the new value
        except OSError as err:
            # Losing the marker only means a later resume will not know to rewind; that must
            # not stop training.
            log.warning("cannot write %s (%s); resumes will not rewind W&B", self._marker, err)
            self._marker = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at optimizer step `step` (calls for the same step merge into one row)."""
        if self._run is None:
            return
        if self._last_logged is None or step > self._last_logged:
            self._write_marker(step)
        self._guarded(lambda run: run.log(dict(metrics), step=step))

    def summary(self, values: dict) -> None:
        """Set run summary values (shown in the W&B runs table)."""
        self._guarded(lambda run: run.summary.update(scrub_secrets(values)))

    def mark_preempting(self) -> None:
        """The job stops to be requeued: W&B shows the run as preempted, not failed."""
        self._guarded(lambda run: run.mark_preempting())

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (0 marks it finished, anything else failed). Safe to call twice."""
        self._guarded(lambda run: run.finish(exit_code=exit_code))
        self._run = None

    def _guarded(self, call) -> None:
        """W&B must never stop training: its service process can die under it (SLURM signals
        every process of a job step, and SIGTERM ends wandb-core). Then warn once, stop
        tracking, and go on; metrics.jsonl and the checkpoints are unaffected."""
        if self._run is None:
            return
        try:
            call(self._run)
        except Exception as err:
            log.warning(
                "W&B stopped working (%s: %s); training goes on without it", type(err).__name__, err
            )
            self._run = None


def _read_marker(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["last_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # never logged from this dir (or unreadable): nothing known to rewind
