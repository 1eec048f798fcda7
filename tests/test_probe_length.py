"""benchmarks/probe_length.py: its examples put the needle where asked, its replayed writes are
the memory's own (gates, per-token gradient norms at the chunk-start weights), the gate
intervention does what it says, and the CLI runs."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_length as PL  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402
from titans_train.models.memory import NeuralMemory, causal_conv  # noqa: E402
from titans_train.models.memory_math import mlp_forward  # noqa: E402


def test_examples_put_the_needle_at_the_distance():
    for length, distance in [(128, 0), (128, 20), (512, 300)]:
        e = PL.passkey_at(length, distance, index=1)
        tokens, (a, b) = e["tokens"], e["answer"]
        assert len(tokens) == len(e["classes"]) == length
        question = a - len("\nWhat is the pass key? The pass key is")
        assert question - e["needle"][1] == distance
        value = bytes(tokens[a:b]).decode().strip()
        assert bytes(tokens[slice(*e["needle"])]).decode().count(value) == 2
        assert [c for c in e["classes"][slice(*e["needle"])] if c == "value"] == ["value"] * 10
        assert set(e["classes"][e["needle"][1] : question]) <= set(PL.CLASSES[2:6])
    e = PL.passkey_at(512, 0, 0)  # the 90-byte noise paragraph repeats: later passes labelled
    assert {"filler0", "filler1", "filler2", "filler3+"} <= set(e["classes"])


def test_a_distance_that_does_not_fit_is_refused():
    room = PL.passkey_room(128)
    PL.passkey_at(128, room, 0)
    try:
        PL.passkey_at(128, room + 1, 0)
    except ValueError as err:
        assert "does not fit" in str(err)
    else:
        raise AssertionError("no error")


def test_replay_gradient_norm_is_autograd_s():
    torch.manual_seed(0)
    mem = NeuralMemory(dim=16, heads=2, chunk_size=4, depth=2).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    rec = PL.replay(mem, x, None)
    # token 5 sits in the second chunk: its gradient is taken at the weights after the first
    _, state = mem(x[:, :4])
    qkv, _ = causal_conv(F.linear(x, mem.w_qkv), mem.conv, None)
    _, k, v = mem._qkv_heads(qkv)
    ws = [w.detach().clone().requires_grad_(True) for w in state.weights]
    t = 5
    out = mlp_forward(ws, k[:, t : t + 1], mem.residual_norm)[0]
    loss = 0.5 * (out - v[:, t : t + 1]).pow(2).sum((-1, -2))  # [heads]
    norms = []
    for h in range(2):
        g = torch.autograd.grad(loss[h], ws, retain_graph=True)
        norms.append(torch.sqrt(sum(gi[h].pow(2).sum() for gi in g)))
    assert torch.allclose(rec["grad"][0, t], sum(norms) / 2, rtol=1e-6)  # mean over heads
    assert torch.allclose(rec["loss"][0, t], loss.mean(), rtol=1e-6)
    assert torch.allclose(rec["theta"][0, t], mem._gates(x)[0][:, t].mean())


def test_zero_forgetting_keeps_the_whole_needle():
    torch.manual_seed(0)
    cfg = dict(vocab_size=320, dim=32, depth=1, heads=2, window=16, chunk_size=16)
    model = TitansLM(ModelConfig(variant="mag", num_persistent=4, **cfg)).eval()
    exs = [PL.passkey_at(256, 100, i) for i in range(2)]
    with torch.no_grad():
        _, rec = PL.write_records(model, exs, 128)
        assert PL.needle_fate(rec[0], exs)["keep"] < 0.5  # alpha ~ 0.007 over ~140 tokens
        PL.scale_gates(model, alpha=0.0)
        _, rec = PL.write_records(model, exs, 128)
    assert PL.needle_fate(rec[0], exs)["keep"] == 1.0
    assert rec[0]["alpha"].abs().max() == 0


def test_smoke_cli(tmp_path):
    out = tmp_path / "p.json"
    report = PL.main(["--smoke", "--out", str(out)])
    assert torch.is_grad_enabled()  # the caller's grad mode is left as it was
    assert json.loads(out.read_text())["recall"] == report["recall"]
    assert set(report["recall"]["256"]) == {"8", "120"}
    cell = report["recall"]["256"]["120"]
    assert 0 <= cell["exact"] <= 100 and cell["logp"] < 0 and set(cell["fate"]) == {"0", "1"}
    by_class = report["writes"]["256"]["0"]["by_class"]
    assert {"value", "filler0", "question"} <= set(by_class)


def test_gate_scaling_before_a_position_only():
    torch.manual_seed(0)
    cfg = dict(vocab_size=320, dim=32, depth=1, heads=2, window=16, chunk_size=16)
    model = TitansLM(ModelConfig(variant="mag", num_persistent=4, **cfg)).eval()
    tokens = torch.randint(0, 320, (2, 96))

    def logits(**kw):
        restore = PL.scale_gates(model, **kw) if kw else (lambda: None)
        with torch.no_grad():
            out = torch.cat([lg for _, lg in PL.stream_logits(model, tokens, 32)], 1)
        restore()
        return out

    plain, everywhere = logits(), logits(alpha=0.0, theta=0.0)
    assert not torch.allclose(plain, everywhere)
    assert torch.equal(logits(alpha=0.0, theta=0.0, until=0), plain)
    # causal: up to 40 as if scaled over the whole sequence (but not the persistent tokens)
    full, part = logits(alpha=0.0, theta=0.0, until=96), logits(alpha=0.0, theta=0.0, until=40)
    assert not torch.allclose(full, everywhere) and not torch.allclose(full, plain)
    assert torch.allclose(part[:, :40], full[:, :40])
    assert not torch.allclose(part[:, 40:], full[:, 40:])
    assert torch.equal(logits(), plain)  # undone
