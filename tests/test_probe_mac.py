"""benchmarks/probe_mac.py: the smoke run, and that its finite differences and patches measure
what they claim (the state round trip is exact, the gain is a derivative, the patches rewire)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_mac as P  # noqa: E402

SEG = P.BASE["segment_len"]


def tokens(n_seg: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, P.BASE["vocab_size"], (batch, n_seg * SEG), generator=g)


def test_smoke_writes_json(tmp_path):
    out = tmp_path / "probe.json"
    P.main(["--smoke", "--experiments", "default", "read_M0", "--out", str(out)])
    report = json.loads(out.read_text())
    names = {(r["variant"], r["retrieval"], r["experiment"]) for r in report["results"]}
    assert names == {
        ("mac", "per_token", "default"),
        ("mac", "memory_tokens", "default"),
        ("mac", "per_token", "read_M0"),
    }
    for r in report["results"]:
        assert len(r["sensitivity_params"]) == 4 and len(r["gain"]) == 3
        assert all(0 < v < 1e-3 for v in r["sensitivity_params"])  # eps 1e-7: linear regime
        assert all(math.isfinite(v) and v > 0 for v in r["gain"])
        assert len(r["gradient_reach"]) == 4 and r["gradient_reach"][-1] == 1.0
    diag = report["diagnostics"]["mac per_token default"]
    assert len(diag) == 4 * 2  # segments x blocks
    assert {"theta", "eta", "alpha", "read_over_input", "weight_norm"} <= set(diag[-1])
    assert abs(diag[0]["theta"] - 0.1 * torch.sigmoid(torch.tensor(-2.0)).item()) < 5e-3
    assert len(report["summary"]) == 3


def test_unknown_experiment_is_rejected(capsys):
    with pytest.raises(SystemExit):
        P.main(["--smoke", "--experiments", "nope"])
    assert "unknown experiment 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("variant,retrieval", [("mac", "per_token"), ("lmm", None)])
def test_state_round_trip_is_exact(variant, retrieval):
    """Continuing from a state rebuilt by ``perturbed`` with a zero delta equals one call, so the
    gain's finite differences act on the model's real carried state."""
    model = P.build(variant, retrieval, {})
    x = tokens(2)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :SEG])
        blocks = list(range(len(model.blocks)))
        zero = [torch.zeros_like(t) for t in P.flatten(first.state, blocks)]
        second = model(x[:, SEG:], state=P.perturbed(first.state, blocks, zero))
    torch.testing.assert_close(second.logits, full[:, SEG:], rtol=0, atol=1e-12)


def test_gain_is_a_derivative():
    """In the linear regime the finite-difference gain does not depend on eps."""
    model, x = P.build("mac", "per_token", {}), tokens(3)
    small = P.segment_gains(model, x, 1e-8, [0, 1])
    large = P.segment_gains(model, x, 1e-6, [0, 1])
    assert all(g > 0.1 for g in small)
    for a, b in zip(small, large):
        assert abs(a - b) < 1e-3 * a


def test_gradient_reach_stops_at_the_receptive_field():
    """Sliding-window attention (2 layers x window 8) passes no gradient 3 segments back."""
    model = P.build("transformer", None, {"cfg": {"window": 8}})
    reach = P.gradient_reach(model, tokens(4))
    assert reach[0] == 0.0 and reach[1] == 0.0 and reach[2] > 1e-6


def test_write_input_patch_writes_the_block_input():
    """write=input: MAC block 0's memory after a segment is the memory written with norm1(x)."""
    model, x = P.build("mac", "per_token", P.EXPERIMENTS["write_input"]), tokens(1)
    block = model.blocks[0]
    with torch.no_grad():
        got = model(x).state.blocks[0].mem.weights
        want = block.memory(block.norm1(model.embed(x)))[1].weights
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_mac_write_option_equals_the_write_input_patch():
    """model.mac_write=input computes what the probe's write=input patch did (same logits)."""
    x = tokens(2)
    with torch.no_grad():
        patched = P.build("mac", "per_token", P.EXPERIMENTS["write_input"])(x).logits
        option = P.build("mac", "per_token", P.EXPERIMENTS["mac_write_input"])(x).logits
    torch.testing.assert_close(option, patched, rtol=0, atol=1e-12)


def test_write_stopgrad_h_keeps_the_forward_and_cuts_the_backward():
    """write=stopgrad_h: the same logits; the gradient of a late loss into the first segment
    changes (the write -> y -> h -> M_prev path is cut, the others stay)."""
    x = tokens(3)
    plain, cut = (
        P.build("mac", "per_token", {}),
        P.build("mac", "per_token", P.EXPERIMENTS["write_stopgrad_h"]),
    )
    with torch.no_grad():
        torch.testing.assert_close(cut(x).logits, plain(x).logits, rtol=0, atol=1e-12)
    a, b = P.gradient_reach(plain, x), P.gradient_reach(cut, x)
    assert b[0] > 0 and abs(a[0] - b[0]) > 1e-3 * a[0]


def test_stopgrad_option_has_the_patchs_gradients():
    """model.mac_write=output_stopgrad: the gradients of the probe's write=stopgrad_h patch."""
    x, grads = tokens(2), []
    for exp in ({"write": "stopgrad_h"}, {"cfg": {"mac_write": "output_stopgrad"}}):
        model = P.build("mac", "per_token", exp)
        model(x).logits.pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # the patch holds y_norm in a closure (unregistered); every other parameter is compared
    assert {n for n in grads[1] if n not in grads[0]} == {
        f"blocks.{i}.y_norm.weight" for i in (0, 1)
    }
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_read_initial_patch_reads_m0():
    """With read=initial, MAC's retrieval reads M_0 whatever memory the state carries."""
    model = P.build("mac", "per_token", P.EXPERIMENTS["read_M0"])
    memory = model.blocks[0].memory
    plain = P.build("mac", "per_token", {}).blocks[0].memory
    with torch.no_grad():
        w = plain(torch.randn(1, SEG, P.BASE["dim"], dtype=torch.float64))[1]
        written = P.MemoryState(w.weights, w.momentum, None, None, SEG)  # retrieval keeps no tail
        xs = torch.randn(1, SEG, P.BASE["dim"], dtype=torch.float64)
        got = memory(xs, written, read_only=True)[0]
        m0 = plain(xs, P.MemoryState(None, None, None, None, SEG), read_only=True)[0]
        moved = plain(xs, written, read_only=True)[0]
    torch.testing.assert_close(got, m0, rtol=0, atol=0)
    assert (moved - m0).abs().max() > 1e-3


@pytest.fixture(scope="module")
def trained_run(short_doc_shards, tmp_path_factory):
    """A 2-step MAC run (segment 16, forgetting bias -6.9) trained in this process."""
    from trainer_helpers import train_here

    run = tmp_path_factory.mktemp("probe-run")
    model = ["model.segment_len=16", "model.chunk_size=8"]
    ran = train_here(short_doc_shards, run, 2, *model, "model.memory_forget_bias=-6.9")
    assert ran.returncode == 0, ran.stderr[-2000:]
    return run


@pytest.mark.slow  # ~25 s with the module's 2-step run
def test_checkpoint_probes_the_trained_model(trained_run, tmp_path):
    """--checkpoint: the probes run on the run's own model (its segment length and its gates:
    alpha ~ sigmoid(-6.9) = 0.001, not the default init's 0.0067), on both input kinds."""
    out = tmp_path / "probe.json"
    argv = ["--checkpoint", str(trained_run), "--segments", "8", "--seeds", "2", "--batch", "1"]
    report = P.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    from probe_trained import probe_tokens

    from titans_train.load import open_checkpoint

    ckpt = open_checkpoint(trained_run)  # the checkpoint's weights, not a fresh init
    x = probe_tokens("random", ckpt, 128, 1, 0)
    want = P.gradient_reach(ckpt.model().to(torch.float64), x, 16)
    assert report["probes"]["random"]["seeds"][0]["gradient_reach"] == pytest.approx(want)
    assert report["step"] == 2 and report["segment_len"] == 16 and report["tokens"] == 128
    for kind in ("random", "text"):
        probe = report["probes"][kind]
        assert [s["seed"] for s in probe["seeds"]] == [0, 1]
        for s in probe["seeds"]:
            assert len(s["gain"]) == 7 and all(math.isfinite(g) and g > 0 for g in s["gain"])
            assert len(s["gradient_reach"]) == 8 and s["gradient_reach"][-1] == 1.0
            assert len(s["self_gain_geomean"]) == 2
        assert len(probe["rows"]) == 8 * 2  # segments x blocks
        for block in probe["summary"]["blocks"]:
            assert len(block["alpha_by_segment"]) == 8
            assert 0.0008 < block["alpha"] < 0.0013, block["alpha"]
            assert 0 < block["kept_of_first_write"] < 1
            assert block["read_over_input"][0] > 0  # MAC's read was logged


@pytest.mark.slow
def test_checkpoint_text_is_passkey_text(trained_run):
    """The text input is the study's pass-key examples, encoded with the run's tokenizer."""
    from probe_trained import probe_tokens

    from titans_train.load import open_checkpoint

    tokens = probe_tokens("text", open_checkpoint(trained_run), 128, 2, 0)
    assert tokens.shape == (2, 128)
    assert "pass key" in bytes(tokens[0].tolist()).decode()


@pytest.mark.parametrize(
    "extra,message",
    [(["--kinds", "words"], "unknown --kinds 'words'"), (["--smoke"], "no experiments or --smoke")],
)
def test_checkpoint_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit):
        P.main(["--checkpoint", "somewhere", *extra])
    assert message in capsys.readouterr().err
