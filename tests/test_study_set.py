"""benchmarks/study.py --set: model overrides for every variant, parsed and checked, and the
SwiGLU width re-matched so the parameter count stays equal."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402


def test_set_parses_numbers_and_names():
    got = study.parse_set(["memory_forget_bias=-8", "memory_heads=2", "mac_write=input"])
    assert got == {"memory_forget_bias": -8, "memory_heads": 2, "mac_write": "input"}


@pytest.mark.parametrize("item", ["memory_forget_bias", "no_such_key=1"])
def test_set_refuses_a_bad_item(item):
    with pytest.raises(SystemExit, match="--set"):
        study.parse_set([item])


def test_set_keeps_the_parameter_count():
    target = TitansLM(ModelConfig(variant="mac", **study.MODEL)).num_params()
    plain, _ = study.match_ffn("mag", target)
    ffn, params = study.match_ffn("mag", target, {"memory_heads": 1})
    assert ffn != plain and abs(params - target) / target < 0.01
