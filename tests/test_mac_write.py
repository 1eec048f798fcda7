"""model.mac_write: what MAC writes into its memory (the paper: the attention output y; "input":
the segment's normed block input; "output_stopgrad": y, with no gradient from the write back into
the retrieved h; docs/results.md "Why MAC does not recall")."""

import pytest
import torch
from doc_helpers import documents, marks
from test_models import streamed

from titans_train.models import ModelConfig, TitansLM

DT = torch.float64
MODES = ["per_token", "memory_tokens"]
OPTIONS = [(w, m) for w in ("input", "output_stopgrad") for m in MODES]


def tiny(mode="per_token", **kw):
    cfg = dict(
        variant="mac", vocab_size=61, dim=32, depth=2, heads=4, window=6, segment_len=12,
        chunk_size=4, num_persistent=4, num_memory_tokens=3, mac_retrieval=mode,
    )  # fmt: skip
    cfg.update(kw)
    torch.manual_seed(0)
    return TitansLM(ModelConfig(**cfg)).to(DT).eval()


def tokens(T=31, seed=2):
    return torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(seed))


def test_default_is_the_paper():
    assert ModelConfig().mac_write == "output"
    x = tokens()
    default, explicit = tiny(), tiny(mac_write="output")
    assert default.state_dict().keys() == explicit.state_dict().keys()
    torch.testing.assert_close(default(x).logits, explicit(x).logits, rtol=0, atol=0)
    assert not torch.allclose(default(x).logits, tiny(mac_write="input")(x).logits)


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match=r"model\.mac_write='y'"):
        ModelConfig(mac_write="y")


@pytest.mark.parametrize("mode", MODES)
def test_stopgrad_keeps_the_values_and_changes_the_gradient(mode):
    """output_stopgrad: the same logits as the paper's write, other gradients (the path
    write -> y -> h is cut; tests/test_probe_mac.py checks them against the probe's patch)."""
    x = tokens(T=24)
    paper, cut = tiny(mode), tiny(mode, mac_write="output_stopgrad")
    assert paper.state_dict().keys() == cut.state_dict().keys()
    torch.testing.assert_close(cut(x).logits, paper(x).logits, rtol=0, atol=0)
    grads = []
    for model in (paper, cut):
        model(x).logits.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() > 1e-6 * grads[0].abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_input_mode_writes_the_normed_segment_input(mode):
    """Every write of the memory is the block's norm1(x) over the segment, not RMSNorm(y)."""
    model = tiny(mode, mac_write="input")
    block = model.blocks[1]
    seen, write_inputs = [], []
    block.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    forward = block.memory.forward

    def logged(x, state=None, read_only=False, **kw):
        if not read_only:
            write_inputs.append(x)
        return forward(x, state, read_only=read_only, **kw)

    block.memory.forward = logged
    with torch.no_grad():
        model(tokens())
    want = block.norm1(seen[0])
    assert [w.shape[1] for w in write_inputs] == [12, 12, 7]
    torch.testing.assert_close(torch.cat(write_inputs, 1), want, rtol=0, atol=0)


@pytest.mark.parametrize("write,mode", OPTIONS)
def test_streaming_equals_one_call(write, mode):
    model = tiny(mode, mac_write=write)
    x = tokens()
    full = model(x).logits
    for sizes in ([1] * 31, [5, 7, 13, 6], [12, 19]):
        torch.testing.assert_close(streamed(model, x, sizes)[0], full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("write,mode", OPTIONS)
def test_causal_and_every_parameter_gets_gradient(write, mode):
    model = tiny(mode, mac_write=write)
    x = tokens()
    base = model(x).logits
    x2 = x.clone()
    x2[:, 17] = (x2[:, 17] + 1) % 61
    out = model(x2).logits
    torch.testing.assert_close(out[:, :17], base[:, :17], rtol=0, atol=1e-12)
    assert (out[:, 17] - base[:, 17]).abs().max() > 1e-6
    model.train()
    model(x, targets=x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("write,mode", OPTIONS)
def test_packed_documents_get_their_logits_alone(write, mode):
    model = tiny(mode, mac_write=write, segment_len=8)
    x = tokens(29, seed=3)
    starts = marks(29, [[5, 8, 20], [16]])
    with torch.no_grad():
        packed = model(x, doc_starts=starts).logits
        for b in range(2):
            for a, e in documents(starts, b):
                alone = model(x[b : b + 1, a:e]).logits
                torch.testing.assert_close(packed[b : b + 1, a:e], alone, rtol=0, atol=1e-10)
