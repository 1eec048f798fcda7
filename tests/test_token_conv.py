"""model.token_conv: a causal depthwise conv on the embeddings, x + conv(x) (models/token_conv.py).

Off by default, zero-initialised (a new model's logits are the plain model's), against a
written-out reference, and exact under streaming and packed documents (fp64, 1e-10), like every
other part of the model (tests/test_documents_model.py)."""

import random

import pytest
import torch
from doc_helpers import assert_documents_alone, assert_streaming_equals_one_call, marks

from titans_train.models import ModelConfig, TitansLM

VOCAB = 64
VARIANTS = [("transformer", None), ("transformer", 6), ("mag", 6), ("mac", 6)]
pytestmark = pytest.mark.usefixtures("float64")


def model(variant: str, window, conv: int = 3, seed: int = 0, trained: bool = True) -> TitansLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        variant=variant, vocab_size=VOCAB, dim=32, depth=2, heads=4, window=window,
        segment_len=8, chunk_size=4, num_persistent=2, token_conv=conv,
    )  # fmt: skip
    m = TitansLM(cfg)
    if conv and trained:  # as after training: taps and bias away from their zero init
        with torch.no_grad():
            m.token_conv.weight.normal_(std=0.5)
            m.token_conv.bias.normal_(std=0.1)
    return m


def reference(x, weight, bias, doc_starts=None):
    """y[b, t] = x[b, t] + bias + sum_j w[K-1-j] x[b, t-j] over the taps in t's document."""
    B, T, _ = x.shape
    K = weight.shape[-1]
    out = x + bias
    for b in range(B):
        first = 0
        for t in range(T):
            if doc_starts is not None and doc_starts[b, t]:
                first = t
            for j in range(K):
                if t - j >= first:
                    out[b, t] = out[b, t] + weight[:, 0, K - 1 - j] * x[b, t - j]
    return out


def test_off_by_default_and_zero_at_init():
    plain = model("mag", 6, conv=0)
    assert ModelConfig().token_conv == 0 and plain.token_conv is None
    assert not any("token_conv" in k for k in plain.state_dict())
    fresh = model("mag", 6, conv=4, trained=False)
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, plain(tokens).logits, rtol=0, atol=0)
    # zero taps still learn: the gradient reaches them at init
    fresh(tokens).logits.pow(2).sum().backward()
    assert fresh.token_conv.weight.grad.abs().sum() > 0


def test_conv_equals_the_reference_with_and_without_documents():
    m = model("transformer", None)
    x = torch.randn(3, 17, 32)
    starts = marks(17, [[5, 6], [], [12]])
    conv = m.token_conv
    for docs in (None, starts):
        y, _ = conv(x, None, docs)
        want = reference(x, conv.weight, conv.bias, docs)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant,window", VARIANTS)
def test_streaming_equals_one_call(variant, window):
    m = model(variant, window)
    tokens = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        whole = m(tokens).logits
        state, outs = None, []
        for a, e in [(0, 1), (1, 10), (10, 23)]:
            out = m(tokens[:, a:e], state=state)
            outs.append(out.logits)
            state = out.state
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant,window", VARIANTS)
def test_packed_documents_get_their_logits_alone(variant, window):
    m = model(variant, window)
    T = 21
    rows = [[5, 6, 14], [9], []]
    tokens = torch.randint(0, VOCAB, (3, T))
    assert_documents_alone(m, tokens, marks(T, rows))


@pytest.mark.parametrize("variant,window", VARIANTS)
def test_streaming_packed_input_equals_one_call(variant, window):
    """Cuts anywhere, also right after a document start, with the tail carried."""
    m = model(variant, window)
    T = 27
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, T), generator=g)
    starts = torch.rand(3, T, generator=g) < 0.2
    starts[0, 9] = True  # a piece below ends at 10: its tail holds one token of this document
    rng = random.Random(variant)
    for cuts in ([10, 11, 20], sorted(rng.sample(range(1, T), 3))):
        assert_streaming_equals_one_call(m, tokens, starts, cuts)


@pytest.mark.parametrize("bad", [-1, True])
def test_bad_width_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="model.token_conv"):
        ModelConfig(token_conv=bad)
