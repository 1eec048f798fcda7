"""Checkpointing of the memory's chunk loop chosen by size (issue 16): TitansLM.forward keeps the
chunk states when they fit ``runtime.memory_checkpoint_budget_mb`` and checkpoints beyond it;
outputs and gradients are the same either way."""

from __future__ import annotations

import pytest
import torch

from titans_train.models import ModelConfig, TitansLM
from titans_train.models.memory import NeuralMemory
from titans_train.models.runtime import RuntimeConfig

CFG = dict(
    vocab_size=61, dim=16, depth=2, heads=2, window=8, segment_len=8, chunk_size=4,
    num_persistent=2, memory_depth=2, memory_expansion=2,
)  # fmt: skip


def build(variant: str, budget_mb: float) -> TitansLM:
    torch.manual_seed(0)
    runtime = RuntimeConfig(memory_backend="eager", memory_checkpoint_budget_mb=budget_mb)
    return TitansLM(ModelConfig(variant=variant, **CFG), runtime).double()


def run(model: TitansLM, T: int, B: int = 2):
    """(loss, gradients, bytes of tensors saved for backward, checkpointing chosen)."""
    x = torch.randint(0, 61, (B, T + 1), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    mems = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert len({m.checkpoint_active for m in mems}) == 1
    return loss.detach(), grads, sum(saved), mems[0].checkpoint_active


def state_mb(model: TitansLM, T: int, B: int = 2) -> float:
    mems = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    return sum(m.chunk_state_bytes(B, T + model.cfg.num_persistent) for m in mems) / 2**20


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_short_sequence_keeps_states_long_one_checkpoints(variant):
    short, long = 16, 64
    # a budget between the two sequences' chunk states
    budget = (state_mb(build(variant, 0), short) + state_mb(build(variant, 0), long)) / 2
    results = {}
    for T in (short, long):
        for b in (0.0, budget, 1e6):  # always checkpoint, by size, never
            results[T, b] = run(build(variant, b), T)
    for T in (short, long):
        assert results[T, 0.0][3] is True and results[T, 1e6][3] is False
        for b in (budget, 1e6):  # identical losses and gradients whatever was kept
            torch.testing.assert_close(results[T, b][0], results[T, 0.0][0], rtol=0, atol=0)
            for name, g in results[T, 0.0][1].items():
                torch.testing.assert_close(results[T, b][1][name], g, rtol=0, atol=0)
    assert results[short, budget][3] is False  # short: kept
    assert results[short, budget][2] > results[short, 0.0][2]
    assert results[long, budget][3] is True  # long: checkpointed, saves only group inputs
    assert results[long, budget][2] == results[long, 0.0][2] < results[long, 1e6][2]


def test_default_budget_keeps_the_small_models_states():
    """The tiny MAC of benchmarks/bench_small.py (batch 16 x 128) runs without the recompute."""
    cfg = ModelConfig(variant="mac", vocab_size=128, dim=64, depth=2, heads=4, window=32,
                      segment_len=32, chunk_size=8, num_persistent=4, memory_depth=2)  # fmt: skip
    model = TitansLM(cfg, RuntimeConfig())
    assert state_mb(model, 128, 16) < RuntimeConfig().memory_checkpoint_budget_mb
    x = torch.randint(0, 128, (16, 128))
    model(x)
    assert all(m.checkpoint_active is False for m in model.modules() if isinstance(m, NeuralMemory))


def test_negative_budget_is_rejected():
    with pytest.raises(ValueError, match="runtime.memory_checkpoint_budget_mb=-1"):
        RuntimeConfig(memory_checkpoint_budget_mb=-1)
