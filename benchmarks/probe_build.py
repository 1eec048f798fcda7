"""The probes' tiny models and experiments: the base configuration, one factor changed at a time
by config, gate biases, init scales or a patch of the built model (never the model code).

Imported by ``probe_mac.py`` (its ``--smoke`` runs them), ``probe_trained.py`` and
``probe_retrieval.py``; ``probe_mac.py`` re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn

from titans_train.models import ModelConfig, TitansLM
from titans_train.models.memory import MemoryState

BASE = dict(
    vocab_size=320, dim=64, depth=2, heads=4, segment_len=32, chunk_size=8, num_persistent=4
)
DT = torch.float64

# name -> changes: "cfg" (ModelConfig fields), "bias" (gate pre-activation biases theta/eta/alpha;
# defaults -2, 0, -5), "qkv_std" (memory W_qkv init std, default 1/sqrt(dim)), "m0_scale" (factor
# on the learned initial memory weights M_0), "write" ("input": MAC writes its block input instead
# of the attention output y; "stopgrad_h": the same forward, but the write's y is computed with
# the retrieved h detached, so no gradient runs write -> y -> h -> M_prev), "read" ("initial": MAC
# retrieves from M_0 in every segment).
EXPERIMENTS: dict[str, dict] = {
    "default": {},
    "max_lr_0.01": {"cfg": {"memory_max_lr": 0.01}},
    "max_lr_0.03": {"cfg": {"memory_max_lr": 0.03}},
    "max_lr_0.3": {"cfg": {"memory_max_lr": 0.3}},
    "eta_0": {"bias": {"eta": -30.0}},
    "eta_0.9": {"bias": {"eta": 2.2}},
    "alpha_0": {"bias": {"alpha": -30.0}},
    "alpha_0.0003": {"bias": {"alpha": -8.1}},
    "alpha_0.001": {"bias": {"alpha": -6.9}},
    "alpha_0.003": {"bias": {"alpha": -5.8}},
    "alpha_0.05": {"bias": {"alpha": -2.94}},
    "m0_0.3x": {"m0_scale": 0.3},
    "alpha_0_m0_0.3x": {"bias": {"alpha": -30.0}, "m0_scale": 0.3},
    "alpha_0_m0_0.1x": {"bias": {"alpha": -30.0}, "m0_scale": 0.1},
    "qkv_std_0.02": {"qkv_std": 0.02},
    "qkv_std_0.5x": {"qkv_std": 0.5 / math.sqrt(BASE["dim"])},
    "chunk_2": {"cfg": {"chunk_size": 2}},
    "chunk_32": {"cfg": {"chunk_size": 32}},
    "memory_depth_1": {"cfg": {"memory_depth": 1}},
    "no_residual_norm": {"cfg": {"memory_residual_norm": False}},
    "depth1_no_residual_norm": {"cfg": {"memory_depth": 1, "memory_residual_norm": False}},
    "write_input": {"write": "input"},
    "mac_write_input": {"cfg": {"mac_write": "input"}},  # the model option (= write_input)
    "write_stopgrad_h": {"write": "stopgrad_h"},
    "write_input_alpha_0.001": {"write": "input", "bias": {"alpha": -6.9}},
    "read_M0": {"read": "initial"},
    "read_M0_alpha_0": {"read": "initial", "bias": {"alpha": -30.0}},
    "window_32": {"cfg": {"window": 32}},  # MAG/MAL only (MAC's attention is its segment)
}
GATES = {"theta": 0, "eta": 1, "alpha": 2}


def patch_write_input(block: nn.Module) -> None:
    """MAC writes its (normed) block input instead of RMSNorm(y): experiment only. The segment's
    input is the first positioned ``project`` call of a segment (later calls project h)."""
    seen: list = []
    project = block.attn.project

    def recording_project(xs, pos):
        if pos is not None and not seen:
            seen.append(xs)
        return project(xs, pos)

    class Input(nn.Module):
        def forward(self, y):
            return seen.pop()

    block.attn.project = recording_project
    block.y_norm = Input()


def patch_write_stopgrad_h(block: nn.Module) -> None:
    """MAC writes RMSNorm(y') with y' = y computed over a detached h: the forward is unchanged
    (so is the gain); the backward loses the path write -> y -> h -> M_prev: experiment only."""
    stash: list = []
    attend, y_norm = block.attn.attend, block.y_norm
    i_h = 0 if block.persistent is None else 1

    def attend_both(q, q_nope, groups):
        h = groups[i_h]
        cut = [*groups[:i_h], replace(h, k=h.k.detach(), v=h.v.detach()), *groups[i_h + 1 :]]
        stash.append(attend(q, q_nope, cut))
        return attend(q, q_nope, groups)

    class WriteCut(nn.Module):
        def forward(self, y):
            return y_norm(stash.pop())

    block.attn.attend = attend_both
    block.y_norm = WriteCut()


def patch_read_initial(block: nn.Module) -> None:
    """MAC retrieves from the learned M_0 every segment: cuts the memory -> read -> write loop."""
    memory, forward = block.memory, block.memory.forward

    def forward_from_m0(x, state=None, read_only=False, queries=None):
        if read_only and state is not None:
            state = MemoryState(None, None, None, state.conv_tail, state.pos)
        return forward(x, state, read_only=read_only, queries=queries)

    memory.forward = forward_from_m0


def build(variant: str, retrieval: str | None, exp: dict, seed: int = 0) -> TitansLM:
    """The tiny model of the finding, with one experiment's changes, in fp64 eval mode."""
    cfg = dict(BASE, variant=variant, mac_retrieval=retrieval or "per_token", num_memory_tokens=8)
    cfg.update(exp.get("cfg", {}))
    torch.manual_seed(seed)
    model = TitansLM(ModelConfig(**cfg)).to(DT).eval()
    for block in model.blocks:
        memory = getattr(block, "memory", None)
        if memory is None:
            continue
        with torch.no_grad():
            bias = memory.to_gates.bias.view(3, -1)
            for name, value in exp.get("bias", {}).items():
                bias[GATES[name]].fill_(value)
            if "qkv_std" in exp:
                memory.w_qkv.normal_(std=exp["qkv_std"])
            for w in memory.init_weights:
                w.mul_(exp.get("m0_scale", 1.0))
        if exp.get("write") == "input":
            patch_write_input(block)
        if exp.get("write") == "stopgrad_h":
            patch_write_stopgrad_h(block)
        if exp.get("read") == "initial":
            patch_read_initial(block)
    return model
