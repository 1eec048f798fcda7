"""The Trainer: ``setup()`` builds and restores, ``train_step()`` is one optimizer step, ``fit()``
is the loop. Everything cross-cutting (logging, W&B, validation, checkpoint cadence, preemption,
fault injection) is a callback (titans_train/callbacks/).

One step, top to bottom: the loader hands this rank its micro-batches of the global batch; the
model inside the DeepSpeed engine returns the loss; the engine runs backward and, at the last
micro-batch, the optimizer step (or skips it when the gradients are not finite).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from titans_train import train_state
from titans_train.callbacks.base import Callback, Callbacks, StepResult
from titans_train.config import Config, public_yaml, resolve_mix
from titans_train.data import MicroBatch
from titans_train.distributed import (
    DistEnv,
    mark_progress,
    max_over_ranks,
    set_tf32,
    timeout_for,
)
from titans_train.load import initialize_from
from titans_train.models import TitansLM, apply_activation_checkpointing
from titans_train.models.attention import attention_backend_report
from titans_train.run_dir import RunDir
from titans_train.validation import all_mean, forward_rows, loss_tokens, step_loss_weights


def same_graph_on_every_rank(model: TitansLM, world_size: int) -> None:
    """Data-parallel ranks must run the same graph whatever their rows hold: ZeRO-2 and ZeRO-3
    reduce gradients in the order the backward produces them, and ZeRO-3 gathers parameters
    module call by module call. With the plain path for rows that are one document on one rank
    and the documents path on another, ZeRO-2 summed other parameters' gradients without a
    word (5 % off for MAG) and ZeRO-3 hung or failed a collective (tests/test_loss_mask.py).
    MAC's documents grid, whose length depends on the layout, is padded to the ranks' longest:
    without it MAC under ZeRO-3 failed a collective at the first step."""
    model.document_shortcut = world_size == 1
    model.layout_agree = max_over_ranks if world_size > 1 else None


def planned_steps(cfg: Config) -> int:
    """``train.max_steps``, or fewer when ``train.max_tokens`` is reached first."""
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    if cfg.train.max_tokens:
        return min(cfg.train.max_steps, math.ceil(cfg.train.max_tokens / tokens_per_step))
    return cfg.train.max_steps


class Trainer:
    def __init__(self, cfg: Config, denv: DistEnv, callbacks: list[Callback]):
        self.cfg, self.denv = cfg, denv
        self.callbacks = Callbacks(callbacks)
        self.run = RunDir(cfg.run_path)
        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        self.burn_in = cfg.train.burn_in
        self.max_steps = planned_steps(cfg)
        self.step = self.tokens = self.start_step = self.saved_step = 0
        self.resumed = False
        self.stop_reason: str | None = None
        self.last_metrics: dict = {}
        self.attention: dict = {}
        # Collective timeout now in force; checkpoint saves always get the long start-up one.
        self.collective_timeout = cfg.launch.startup_timeout
        self.engine = self.loader = self.scheduler = None

    def log_main(self, msg: str) -> None:
        if self.denv.is_main:
            tqdm.write(msg, file=sys.stderr)

    def setup(self) -> bool:
        """Resume point, model, engine, loader, restored state; False if nothing is left."""
        cfg, denv = self.cfg, self.denv
        torch.manual_seed(cfg.train.seed)
        set_tf32(cfg.train.tf32)
        if denv.is_main:
            self.run.create()
            resolved = public_yaml(cfg)
            self.run.config.write_text(resolved)
            self.log_main(f"resolved config:\n{resolved}")
        point = train_state.find_resume_point(cfg, denv)
        for message in point.messages:
            self.log_main(message)
        if cfg.data.mix == "auto":  # before anything saves the config: checkpoints hold the mix
            cfg.data.mix = resolve_mix("auto", point.state["config"] if point.state else None)
            self.log_main(f"data.mix=auto: {cfg.data.mix} (docs/data.md, Mixing)")
        if point.path and point.step >= self.max_steps:  # before the engine: nothing to pay for
            self.step, self.tokens = point.step, point.state["tokens"]
            n = 2 * self.max_steps
            self.log_main(
                f"{point.path} is at step {point.step}: the run already reached its "
                f"{self.max_steps} steps, nothing to train. To continue it, raise "
                f'train.max_steps (e.g. train.max_steps={n}; with make: TRAIN_ARGS="'
                f'train.max_steps={n}"), or start a new run with name=<new-name>.'
            )
            return False
        train_state.prepare(point, denv)  # the universal conversion, when the world size changed
        model = TitansLM(cfg.model, runtime=cfg.runtime)
        if cfg.checkpoint.init_from and not point.path:
            self.log_main(initialize_from(model, cfg.checkpoint.init_from))
        elif cfg.checkpoint.init_from:
            self.log_main(f"checkpoint.init_from not used: this run resumes from {point.path}")
        same_graph_on_every_rank(model, denv.world_size)
        if cfg.runtime.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.engine, _, self.scheduler = cfg.zero.build_engine(
            model, cfg.optim, cfg.train, denv.world_size, point.universal
        )
        self.loader = cfg.data.build_loader(
            cfg.train, cfg.model.vocab_size, denv.rank, denv.world_size
        )
        if point.path:
            train_state.restore(point, self.engine, self.loader, denv)
            self.callbacks.load_state_dict(point.state)
            self.step = self.start_step = self.saved_step = point.step
            self.tokens, self.resumed = point.state["tokens"], True
            if point.state["world_size"] != denv.world_size:
                self.log_main("world size changed: RNG states not restored (data order unaffected)")
            self.log_main(f"resumed from {point.path} at step {self.step}")
        param = next(self.engine.module.parameters())  # the activations' device and dtype
        self.attention = attention_backend_report(
            param.device, param.dtype, cfg.runtime.attn_backend, cfg.model.head_dim
        )
        self.log_main(
            f"attention backend: {self.attention['backend']} ({json.dumps(self.attention)})"
        )
        self.callbacks("setup", self)
        return True

    def train_step(self, micro_batches: list[MicroBatch]) -> StepResult:
        """Forward, backward and (at the last micro-batch) the optimizer step; no I/O."""
        skipped_before, losses, burn_in = self.engine.skipped_steps, [], self.burn_in
        weights = step_loss_weights([loss_tokens(mb, burn_in) for mb in micro_batches])
        for mb, weight in zip(micro_batches, weights):  # step_loss_weights is collective
            out = forward_rows(self.engine, mb, burn_in)
            loss = out.loss if weight == 1.0 else out.loss * weight
            if weight == 0.0:
                loss = out.logits.sum() * 0.0  # nothing carries loss: a zero gradient, not NaN
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss)
        return StepResult(all_mean(losses), self.engine.skipped_steps > skipped_before)

    def fit(self) -> dict:
        """Train to ``max_steps``; returns the last metrics, plus ``stopped`` (the reason) when a
        stop was requested and the run ended early after a committed checkpoint."""
        if not self.setup():
            return {"step": self.step, "tokens": self.tokens}
        try:
            while self.step < self.max_steps:
                self.callbacks("before_step", self)  # every rank agrees on stops here
                if self.stop_reason:
                    break
                t0 = time.perf_counter()
                mark_progress(self.denv.rank, self.step + 1, "loading data")
                micro_batches = self.loader.next_step()
                t_data = time.perf_counter() - t0
                self.callbacks("on_batch", self, micro_batches)
                mark_progress(self.denv.rank, self.step + 1, "computing")
                result = self.train_step(micro_batches)
                self.step += 1
                self.tokens += self.tokens_per_step
                result.seconds, result.data_seconds = time.perf_counter() - t0, t_data
                self.callbacks("after_step", self, result)
            if self.stop_reason:
                self.callbacks("on_stop", self, self.stop_reason)
            self.callbacks("on_finish", self)
        except Exception as e:
            self.callbacks("on_error", self, e)
            raise
        finally:
            self.callbacks("close", self)
            self.loader.close()
        out = {"step": self.step, "tokens": self.tokens}
        if self.stop_reason:
            out["stopped"] = self.stop_reason
        return {**out, **self.last_metrics}

    def request_stop(self, reason: str) -> None:
        """Stop before the next step (a collective decision: call it on every rank alike)."""
        self.stop_reason = reason

    def log(self, metrics: dict[str, float], kind: str = "train") -> None:
        """Hand ``metrics`` of this step to every callback's ``on_log`` (files, W&B, console)."""
        if kind == "train":
            self.last_metrics = metrics
        self.callbacks("on_log", self, metrics, kind)

    def save_checkpoint(self) -> Path:
        """Collective: commit a checkpoint of this step, with the callbacks' state."""
        t0 = time.perf_counter()
        extra = self.callbacks.state_dict()
        timeout = self.cfg.launch.startup_timeout
        with timeout_for(timeout, restore=self.collective_timeout):
            path = train_state.save(
                self.cfg, self.engine, self.loader, self.denv, self.step, self.tokens, extra
            )
        self.saved_step = self.step
        self.log_main(f"step {self.step}: checkpoint {path}")
        self.callbacks("on_checkpoint", self, path, time.perf_counter() - t0)
        return path
