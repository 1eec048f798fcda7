"""The Trainer's seams in one process (gloo): the hook order of fit(), train_step() on its own,
callback state through a checkpoint, and a requested stop."""

import logging
import math

import pytest
import torch
from trainer_helpers import EXPERIMENT, base_overrides

from titans_train.callbacks import Callback, default_callbacks
from titans_train.config_load import load_config
from titans_train.models import TitansLM
from titans_train.preemption import Preemption
from titans_train.trainer import Trainer

TINY = ["model.depth=1", "model.dim=32", "model.heads=2", "tracking.mode=disabled"]


class Recorder(Callback):
    """Records every hook; its count of steps is checkpointed state."""

    def __init__(self, stop_at: int | None = None):
        self.events, self.steps, self.loaded, self.stop_at = [], 0, None, stop_at

    def setup(self, trainer):
        self.events.append(("setup", trainer.step))

    def before_step(self, trainer):
        self.events.append(("before_step", trainer.step))
        if trainer.step == self.stop_at:
            trainer.request_stop("test stop")

    def on_batch(self, trainer, micro_batches):
        self.events.append(("on_batch", trainer.step))

    def after_step(self, trainer, result):
        self.steps += 1
        assert math.isfinite(result.loss) and not result.skipped and result.seconds > 0
        self.events.append(("after_step", trainer.step))

    def on_checkpoint(self, trainer, path, seconds):
        self.events.append(("on_checkpoint", trainer.step))

    def on_stop(self, trainer, reason):
        self.events.append(("on_stop", reason))

    def on_finish(self, trainer):
        self.events.append(("on_finish", trainer.step))

    def close(self, trainer):
        self.events.append(("close", trainer.step))

    def state_dict(self):
        return {"recorder_steps": self.steps}

    def load_state_dict(self, state):
        self.loaded = state.get("recorder_steps")


def config(demo_shards, run_dir, steps, *extra):
    overrides = base_overrides(demo_shards, run_dir, steps) + TINY + list(extra)
    return load_config(EXPERIMENT, overrides)


def test_fit_runs_the_hooks_in_order(demo_shards, process_group, tmp_path):
    denv = process_group
    cfg = config(demo_shards, tmp_path / "run", 3, "checkpoint.interval=2")
    rec = Recorder()
    out = Trainer(cfg, denv, [rec, *default_callbacks(cfg, denv, Preemption(0))]).fit()
    want = [("setup", 0)]
    for s in (1, 2, 3):
        want += [("before_step", s - 1), ("on_batch", s - 1), ("after_step", s)]
        if s in (2, 3):
            want.append(("on_checkpoint", s))
    assert rec.events == [*want, ("on_finish", 3), ("close", 3)]
    assert out["step"] == 3 and out["tokens"] == 3 * 8 * 128 and math.isfinite(out["loss"])


def test_callback_state_resumes_and_a_stop_saves_the_step_reached(
    demo_shards, process_group, tmp_path
):
    denv = process_group
    run = tmp_path / "run"
    cfg = config(demo_shards, run, 5, "checkpoint.interval=0")
    first = Recorder(stop_at=2)
    out = Trainer(cfg, denv, [first, *default_callbacks(cfg, denv, Preemption(0))]).fit()
    assert out["stopped"] == "test stop" and out["step"] == 2
    assert ("on_stop", "test stop") in first.events
    assert [e for e in first.events if e[0] == "on_checkpoint"] == [("on_checkpoint", 2)]
    second = Recorder()
    out = Trainer(cfg, denv, [second, *default_callbacks(cfg, denv, Preemption(0))]).fit()
    assert second.loaded == 2 and second.events[0] == ("setup", 2) and out["step"] == 5


def test_train_step_is_a_seam(demo_shards, process_group, tmp_path):
    """What a benchmark or a custom loop calls: one optimizer step on given micro-batches."""
    cfg = config(demo_shards, tmp_path / "run", 2)
    trainer = Trainer(cfg, process_group, [])
    assert trainer.setup()
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    result = trainer.train_step(trainer.loader.next_step())
    after = list(trainer.engine.module.parameters())
    assert math.isfinite(result.loss) and not result.skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    trainer.loader.close()


@pytest.mark.parametrize("stage", [0, 2])
def test_engine_start_up_draws_no_untested_optimizer_warning(
    demo_shards, process_group, tmp_path, stage
):
    """DeepSpeed warns "You are using ZeRO with an untested optimizer" for any optimizer type not
    on its list; every run printed it. At stages 1-3 the optimizer is torch's AdamW itself."""
    cfg = config(demo_shards, tmp_path / "run", 1, f"zero.stage={stage}")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addHandler(handler)
    try:
        model = TitansLM(cfg.model, runtime=cfg.runtime)
        cfg.zero.build_engine(model, cfg.optim, cfg.train, process_group.world_size)
    finally:
        ds_logger.removeHandler(handler)
    assert not [m for m in seen if "untested optimizer" in m], seen
