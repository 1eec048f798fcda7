"""benchmarks/probe_mqar_format.py: its three MQAR formats put the loss on the right tokens,
the short conv starts as the identity, and a few steps run end to end."""

import random
import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_mqar_format as P  # noqa: E402


def test_each_format_marks_the_values_after_the_query_keys():
    for fmt in ("study", "colon", "single"):
        tokens, answers = P.example(fmt, random.Random(3), 128, 4)
        text = bytes(tokens).decode()
        assert len(tokens) == 128 and all(text[a] in string.digits for a in answers)
        per = len(answers) // 4
        queries = text[text.index("\n") :]
        for j in range(4):  # the key before each answer was given that value among the facts
            a = answers[j * per]
            key = text[a - 3 : a - 1] if fmt == "study" else text[a - 1 - (fmt == "colon")]
            value = text[a : a + per]
            fact = f"{key}:{value}" if fmt != "single" else f"{key}{value}"
            assert text.index(fact) < text.index("\n") and a > text.index("\n")
        assert queries.count(" ") == 4
        x, y = P.batch(fmt, random.Random(3), 2, 128, 4)
        assert x.shape == y.shape == (2, 127) and int((y != -100).sum()) == 2 * len(answers)


def test_short_conv_starts_as_the_identity_and_is_causal():
    conv = P.ShortConv(8, 4)
    x = torch.randn(2, 10, 8)
    assert torch.equal(conv(x), x)
    torch.nn.init.normal_(conv.conv.weight)
    y = conv(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # a change at t = 6 moves nothing before it
    assert torch.allclose(conv(x2)[:, :6], y[:, :6]) and not torch.allclose(conv(x2)[:, 6], y[:, 6])


def test_a_few_steps_run(tmp_path):
    out = tmp_path / "r.json"
    res = P.main(["--format", "colon", "--steps", "2", "--conv", "4", "--out", str(out)])
    assert out.is_file() and res["curve"][-1]["step"] == 2
