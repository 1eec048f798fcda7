"""model.memory_forget_bias: the forgetting gate's initial bias (docs/memory.md, "Forgetting")."""

import math

import pytest
import torch

from titans_train.models import ModelConfig, TitansLM
from titans_train.models.memory import NeuralMemory

TINY = dict(vocab_size=64, dim=32, depth=2, heads=2, window=8, segment_len=8, chunk_size=4)


def gate_bias(mem: NeuralMemory) -> torch.Tensor:
    return mem.to_gates.bias.detach().view(3, -1)  # rows: theta, eta, alpha


def test_default_is_minus_five_and_other_gates_unchanged():
    assert ModelConfig().memory_forget_bias == -5.0
    torch.manual_seed(0)
    bias = gate_bias(NeuralMemory(16, 2))
    assert torch.equal(bias[0], torch.full_like(bias[0], -2.0))
    assert torch.equal(bias[1], torch.zeros_like(bias[1]))
    assert torch.equal(bias[2], torch.full_like(bias[2], -5.0))


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_option_sets_alpha_bias_and_nothing_else(variant):
    torch.manual_seed(0)
    base = TitansLM(ModelConfig(variant=variant, **TINY)).state_dict()
    torch.manual_seed(0)
    low = TitansLM(ModelConfig(variant=variant, memory_forget_bias=-6.9, **TINY)).state_dict()
    assert base.keys() == low.keys()
    changed = [k for k in base if not torch.equal(base[k], low[k])]
    gates = [k for k in base if k.endswith("memory.to_gates.bias")]
    assert gates and changed == gates  # same RNG stream: every other tensor is bitwise equal
    for k in gates:
        b, lo = base[k].view(3, -1), low[k].view(3, -1)
        assert torch.equal(b[:2], lo[:2])
        assert torch.equal(lo[2], torch.full_like(lo[2], -6.9))
        alpha = torch.sigmoid(lo[2].double())
        assert math.isclose(alpha[0].item(), 1 / (1 + math.exp(6.9)), rel_tol=1e-6)


def test_reset_parameters_keeps_the_option():
    mem = NeuralMemory(16, 2, forget_bias=-8.1)
    with torch.no_grad():
        mem.to_gates.bias.zero_()
    mem.reset_parameters()
    assert torch.equal(gate_bias(mem)[2], torch.full((2,), -8.1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "-5", True])
def test_bad_value_names_the_key(value):
    with pytest.raises(ValueError, match="model.memory_forget_bias"):
        ModelConfig(memory_forget_bias=value)


def test_round_trips_through_to_dict():
    cfg = ModelConfig(variant="mac", memory_forget_bias=-6.9, **TINY)
    assert ModelConfig.from_dict(cfg.to_dict()).memory_forget_bias == -6.9


def test_yaml_and_override_reach_the_model(tmp_path):
    from titans_train.config_load import load_model_config

    path = tmp_path / "model.yaml"
    path.write_text("variant: mac\nmemory_forget_bias: -7\n")
    assert load_model_config(path).memory_forget_bias == -7.0
    assert load_model_config(path, ["memory_forget_bias=-6.9"]).memory_forget_bias == -6.9
    with pytest.raises(ValueError, match="memory_forget_bias"):
        load_model_config(path, ["memory_forget_bias=abc"])
