"""TitansLM for every variant: causality, streaming, generation cache, batch independence, grads."""

import pytest
import torch

from titans_train.config_load import load_model_config
from titans_train.models import ModelConfig, TitansLM

DT = torch.float64
# (variant, mac_retrieval, window)
VARIANTS = [
    ("mac", "per_token", 6),
    ("mac", "memory_tokens", 6),
    ("mag", "per_token", 6),
    ("mal", "per_token", 6),
    ("lmm", "per_token", 6),
    ("transformer", "per_token", 6),
    ("transformer", "per_token", None),
]
IDS = [f"{v}-{m}" if v == "mac" else f"{v}-w{w}" for v, m, w in VARIANTS]


def tiny(variant, mode="per_token", window=6, **kw):
    cfg = dict(
        variant=variant,
        vocab_size=61,
        dim=32,
        depth=2,
        heads=4,
        window=window,
        segment_len=12,
        chunk_size=4,
        num_persistent=4,
        num_memory_tokens=3,
        mac_retrieval=mode,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return TitansLM(ModelConfig(**cfg)).to(DT).eval()


@pytest.mark.parametrize("variant,mode,window", VARIANTS, ids=IDS)
def test_causal(variant, mode, window):
    """Perturbing token j changes no logit before j: inside a chunk (5), on a chunk boundary (8),
    on a segment boundary (12, 24), inside a segment (17) and far beyond the window (27)."""
    model = tiny(variant, mode, window)
    x = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    base = model(x).logits
    for j in (0, 5, 8, 12, 17, 24, 27):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1 + torch.arange(2)) % 61
        out = model(x2).logits
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-12)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-6


@pytest.mark.parametrize("variant,mode,window", VARIANTS, ids=IDS)
def test_streaming_equals_one_call(variant, mode, window):
    model = tiny(variant, mode, window)
    x = torch.randint(0, 61, (2, 31), generator=torch.Generator().manual_seed(2))
    full = model(x).logits
    gen = torch.Generator().manual_seed(3)
    splits = [[1] * 31]  # token by token
    for _ in range(2):
        cuts = sorted(set(torch.randint(1, 31, (4,), generator=gen).tolist()))
        splits.append([b - a for a, b in zip([0, *cuts], [*cuts, 31])])
    for sizes in splits:
        logits, state = streamed(model, x, sizes)
        torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-10)
        assert state.pos == 31


def streamed(model, x, sizes):
    """``model`` over ``x`` in calls of ``sizes`` tokens, the state carried: (logits, state)."""
    state, outs, t = None, [], 0
    for n in sizes:
        out = model(x[:, t : t + n], state=state)
        state, t = out.state, t + n
        outs.append(out.logits)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("variant,mode,window", VARIANTS, ids=IDS)
def test_generate_cache_equals_no_cache(variant, mode, window):
    model = tiny(variant, mode, window)
    prompt = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    cached = model.generate(prompt, use_cache=True, prefill_chunk=5, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 28)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :19], prompt)


def test_generate_prompt_longer_than_window_and_greedy():
    model = tiny("mac")
    prompt = torch.randint(0, 61, (40,), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=5, temperature=0.0)
    assert out.shape == (45,)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=5, temperature=0.0, seed=1))


@pytest.mark.parametrize("variant,mode,window", VARIANTS, ids=IDS)
def test_batch_independence(variant, mode, window):
    model = tiny(variant, mode, window)
    x = torch.randint(0, 61, (4, 14), generator=torch.Generator().manual_seed(6))
    perm = torch.tensor([3, 1, 0, 2])
    torch.testing.assert_close(model(x[perm]).logits, model(x).logits[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant,mode,window", VARIANTS, ids=IDS)
def test_every_parameter_gets_gradient(variant, mode, window):
    model = tiny(variant, mode, window).float().train()
    x = torch.randint(0, 61, (2, 26), generator=torch.Generator().manual_seed(8))
    out = model(x, targets=x)
    assert out.logits.shape == (2, 26, 61)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_loss_is_mean_cross_entropy_with_ignore_index():
    model = tiny("mag").float()
    x = torch.randint(0, 61, (2, 10))
    y = x.clone()
    y[:, :3] = -100
    out = model(x, targets=y)
    logp = out.logits.log_softmax(-1)[:, 3:]
    want = -logp.gather(-1, y[:, 3:, None]).mean()
    torch.testing.assert_close(out.loss, want)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(dim=30, heads=4), "model.dim"),
        (dict(variant="gpt"), "model.variant"),
        (dict(segment_len=10, chunk_size=4), "model.segment_len"),
        (dict(window=0), "model.window"),
        (dict(variant="mag", window=None), "model.window"),
        (dict(mac_retrieval="both"), "model.mac_retrieval"),
        (dict(attn_backend="cudnn"), "model.attn_backend"),
    ],
)
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig(**kw)


def test_yaml_rejects_unknown_keys(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("variant: mac\ndim: 64\nheads: 4\nwindoww: 3\n")
    with pytest.raises(ValueError, match="windoww"):
        load_model_config(p)
    p.write_text("variant: mac\ndim: 64\nheads: 4\n")
    cfg = load_model_config(p, ["depth=3", "window=null"])
    assert (cfg.depth, cfg.window, cfg.dim) == (3, None, 64)
    with pytest.raises(ValueError, match="model.dim"):
        load_model_config(p, ["heads=5"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_model_config(tmp_path / "nope.yaml")
