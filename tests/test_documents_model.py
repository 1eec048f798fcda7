"""Packed documents through the whole model (issue 13): for every variant, the logits of a
document inside a packed row equal its logits run alone from a fresh state (fp64, 1e-10),
gradients too; packed input split anywhere with the state carried equals one call."""

import random

import pytest
import torch
from doc_helpers import (
    assert_documents_alone,
    assert_streaming_equals_one_call,
    documents,
    marks,
)

from titans_train.models import ModelConfig, TitansLM

VOCAB = 64
# boundaries: inside a segment/chunk (5, 20), on a segment boundary (8, 16), two in one chunk (8, 9)
ROWS = [[5, 8, 9, 20], [16], []]
VARIANTS = [
    ("mac", "per_token"),
    ("mac", "memory_tokens"),
    ("mag", "per_token"),
    ("mal", "per_token"),
    ("lmm", "per_token"),
    ("transformer", "per_token"),
]


pytestmark = pytest.mark.usefixtures("float64")


def model(variant, retrieval="per_token", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        variant=variant, vocab_size=VOCAB, dim=32, depth=2, heads=4, window=6, segment_len=8,
        chunk_size=4, num_persistent=2, memory_depth=2, mac_retrieval=retrieval,
        num_memory_tokens=3,
    )  # fmt: skip
    return TitansLM(cfg)


@pytest.mark.parametrize("variant,retrieval", VARIANTS)
def test_packed_documents_get_their_logits_alone(variant, retrieval):
    m = model(variant, retrieval)
    T = 29
    tokens = torch.randint(0, VOCAB, (len(ROWS), T))
    assert_documents_alone(m, tokens, marks(T, ROWS))


@pytest.mark.parametrize("variant,retrieval", VARIANTS)
def test_gradients_equal_the_documents_alone(variant, retrieval):
    m = model(variant, retrieval)
    T = 19
    tokens = torch.randint(0, VOCAB, (2, T))
    targets = torch.randint(0, VOCAB, (2, T))
    starts = marks(T, [[7, 8], [12]])
    params = [p for p in m.parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy(
        m(tokens, doc_starts=starts).logits.flatten(0, 1), targets.flatten(), reduction="sum"
    )
    g_packed = torch.autograd.grad(loss, params, allow_unused=True)
    ref = sum(
        torch.nn.functional.cross_entropy(
            m(tokens[b : b + 1, a:e]).logits.flatten(0, 1), targets[b, a:e], reduction="sum"
        )
        for b in range(2)
        for a, e in documents(starts, b)
    )
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(g_packed, g_ref):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant,retrieval", VARIANTS)
def test_streaming_packed_input_equals_one_call(variant, retrieval):
    m = model(variant, retrieval)
    T = 31
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, T), generator=g)
    starts = torch.rand(3, T, generator=g) < 0.15
    rng = random.Random(variant)
    for _ in range(2):
        assert_streaming_equals_one_call(m, tokens, starts, sorted(rng.sample(range(1, T), 3)))


@pytest.mark.parametrize("variant,retrieval", VARIANTS)
def test_no_marks_equals_the_plain_model(variant, retrieval):
    m = model(variant, retrieval)
    tokens = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        plain = m(tokens).logits
        docs = m(tokens, doc_starts=torch.zeros(2, 21, dtype=torch.bool)).logits
    torch.testing.assert_close(docs, plain, rtol=0, atol=1e-10)


def test_bad_doc_starts_shape_names_it():
    m = model("mac")
    with pytest.raises(ValueError, match="doc_starts has shape"):
        m(torch.zeros(2, 8, dtype=torch.long), doc_starts=torch.zeros(2, 7, dtype=torch.bool))


@pytest.mark.parametrize("variant,retrieval", VARIANTS)
def test_a_state_without_documents_continues_with_them(variant, retrieval):
    """A sequence begun without doc_starts goes on as its first document."""
    m = model(variant, retrieval)
    tokens = torch.randint(0, VOCAB, (2, 27))
    starts = marks(27, [[19], []])
    with torch.no_grad():
        whole = m(tokens, doc_starts=starts).logits
        first = m(tokens[:, :11])
        rest = m(tokens[:, 11:], state=first.state, doc_starts=starts[:, 11:]).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, rtol=0, atol=1e-10)


@pytest.fixture
def traced_step(monkeypatch):
    """The compiled memory step as dynamo traces it (fullgraph, so a graph break fails), run by
    aot_eager: this test is about which chunks go through the compiled step around document
    starts; inductor's C++ code for it (~1 min of g++ per cold cache) is checked against eager in
    test_memory.py::test_compiled_chunk_step_matches_eager. Counts the step's calls."""
    from titans_train.models import memory_math

    # Dynamo keeps its graphs per code object, so chunk_step's from earlier tests in this
    # process count against the recompile limit, which fullgraph turns into an error.
    torch._dynamo.reset()
    compiled = torch.compile(
        memory_math.chunk_step, backend="aot_eager", dynamic=False, fullgraph=True
    )
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return compiled(*args, **kwargs)

    monkeypatch.setattr(memory_math, "_COMPILED_STEP", counted)
    return calls


@pytest.mark.parametrize(
    "variant,attn,memory",
    [
        ("mag", "flex", "eager"),
        ("mac", "flex", "eager"),
        ("transformer", "flex", "eager"),
        ("mag", "sdpa", "compile"),
    ],
)
def test_other_backends_keep_documents_apart(variant, attn, memory, traced_step):
    """flex (forward only on CPU) and the compiled memory give the documents' logits alone too;
    flash is covered at the attention level through its contract model (test_attention_docs)."""
    from titans_train.models import RuntimeConfig

    torch.manual_seed(0)
    cfg = model(variant).cfg
    m = TitansLM(cfg, runtime=RuntimeConfig(attn_backend=attn, memory_backend=memory))
    T = 29
    tokens = torch.randint(0, VOCAB, (2, T))
    starts = marks(T, ROWS[:2])
    with torch.no_grad():
        packed = m(tokens, doc_starts=starts).logits
        for b in range(2):
            for a, e in documents(starts, b):
                alone = m(tokens[b : b + 1, a:e]).logits
                torch.testing.assert_close(packed[b : b + 1, a:e], alone, rtol=0, atol=1e-10)
    assert (traced_step[0] > 0) == (memory == "compile")  # whole chunks took the compiled step
