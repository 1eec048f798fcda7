"""benchmarks/probe_retrieval.py: its measurements reproduce what the model computes (the
attention weights give attend's output, the reconstructed reads are MAC's retrieved h, the
written values are the memory's own), the twins differ only in the needle, and the CLI runs."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_retrieval as R  # noqa: E402

from titans_train.models.memory import causal_conv  # noqa: E402

SEG = 16


@pytest.fixture(scope="module")
def pairs():
    return R.passkey_pairs(128, 2, seed=0)


def test_twins_differ_only_in_the_needle(pairs):
    assert pairs
    for p in pairs:
        diff = [i for i, (a, b) in enumerate(zip(p["a"], p["b"])) if a != b]
        assert diff and set(diff) <= set(p["needle"])
        assert len(p["a"]) == len(p["b"]) == 128
        a0, a1 = p["answer"]
        assert max(p["needle"]) < a0 and p["a"][a0:a1] == p["b"][a0:a1]


@pytest.mark.parametrize("mode", ["per_token", "memory_tokens"])
def test_attention_weights_reproduce_attend(mode):
    model = R.fresh_model("mac", SEG, 0, mac_retrieval=mode)
    attn, attend, checked = model.blocks[0].attn, model.blocks[0].attn.attend, []

    def check(q, q_nope, groups):
        y = attend(q, q_nope, groups)
        w = R.attention_weights(q, q_nope, groups)
        v = torch.cat([g.v for g in groups], dim=2)
        B, H, T, d = q.shape
        mine = (w @ v).transpose(1, 2).reshape(B, T, -1)
        torch.testing.assert_close(mine, y, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
        checked.append(T)
        return y

    attn.attend = check
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 40)))
    assert checked == [16, 16, 8]


def test_reads_are_macs_retrieved_h_and_values_the_memorys(pairs):
    model = R.fresh_model("mac", SEG, 0)
    rec = R.Recorder(model)
    x = torch.tensor([pairs[0]["a"]])
    out = R.reads_and_values(model, x, SEG, rec)
    for l, block in enumerate(model.blocks):
        h = torch.cat(rec.reads[l], dim=1)  # [1, T, D] as the block attended to it
        read = out[l]["read"]  # [1, H, T, d]
        torch.testing.assert_close(read.transpose(1, 2).reshape(h.shape), h, rtol=0, atol=1e-12)
        mem, D = block.memory, block.memory.dim
        w = torch.cat([xw for xw, _ in rec.writes[l]], dim=1)
        qkv, _ = causal_conv(F.linear(w, mem.w_qkv), mem.conv, None)
        v = mem._heads(F.silu(qkv).split(D, dim=-1)[2])
        torch.testing.assert_close(out[l]["v"][0], v, rtol=0, atol=1e-12)
    rec.close()
    assert "forward" not in vars(model.blocks[0].memory)  # the wrappers are gone


def test_signal_is_zero_for_identical_twins_and_cli_runs(pairs, tmp_path):
    model = R.fresh_model("mag", SEG, 0)
    same = [dict(p, b=p["a"]) for p in pairs]
    for bins in R.needle_signal(model, same, SEG).values():
        for row in bins.values():
            assert row["signal"] == 0.0
    out = tmp_path / "r.json"
    R.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {r["layer"] for r in report["attention"]} == {0, 1}
    for r in report["attention"]:
        total = r["persistent_question"] + r["h_question"] + r["segment_question"]
        assert abs(total - 1) < 1e-9
    for r in report["gradient"]:
        assert r["w_k"] > 0 and r["gates"] > 0 and r["needle_over_question_write_grad"] > 0
