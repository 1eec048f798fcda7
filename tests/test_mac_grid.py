"""MAC's documents grid padded to a length data-parallel ranks agree on (TitansLM.layout_agree).

MAC lays packed documents on a grid whose number of segments, and so of module calls, depends on
where documents start. Under ZeRO-3, which gathers parameters call by call, two ranks with other
layouts failed a collective at the first step (tests/test_loss_mask.py runs that on 2 ranks).
Here, in one process: padding the grid changes no output, state or gradient, and with an agreed
length two layouts make the same module calls in the same order. fp64."""

import pytest
import torch
from doc_helpers import marks

from titans_train import distributed
from titans_train.models import ModelConfig, TitansLM

VOCAB, C = 64, 8
pytestmark = pytest.mark.usefixtures("float64")


def mac(retrieval: str) -> TitansLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant="mac", vocab_size=VOCAB, dim=32, depth=2, heads=4, window=6, segment_len=C,
        chunk_size=4, num_persistent=2, memory_depth=2, mac_retrieval=retrieval,
        num_memory_tokens=3,
    )  # fmt: skip
    return TitansLM(cfg)


def two_calls(m: TitansLM, tokens: torch.Tensor, starts: torch.Tensor, split: int):
    """Logits of both halves, the second continuing the first's state, and the gradients."""
    m.zero_grad()
    first = m(tokens[:, :split], doc_starts=starts[:, :split])
    second = m(tokens[:, split:], state=first.state, doc_starts=starts[:, split:])
    (first.logits.square().mean() + second.logits.square().mean()).backward()
    grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    return first.logits, second.logits, grads


@pytest.mark.parametrize("retrieval", ["per_token", "memory_tokens"])
def test_a_padded_grid_changes_nothing(retrieval):
    m = mac(retrieval)
    T = 27
    tokens = torch.randint(0, VOCAB, (2, T))
    starts = marks(T, [[3, 5, 17], [11]])
    want = two_calls(m, tokens, starts, 13)
    asked = []
    m.layout_agree = lambda n: asked.append(n) or n + 3 * C  # another rank needs 3 more segments
    got = two_calls(m, tokens, starts, 13)
    assert len(asked) == 2 and all(n % C == 0 for n in asked), asked
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def module_calls(m: TitansLM, tokens: torch.Tensor, starts: torch.Tensor) -> list[str]:
    """The names of the modules a forward calls, in order (what ZeRO-3 gathers for)."""
    calls, names = [], {mod: n for n, mod in m.named_modules()}
    hooks = [
        mod.register_forward_pre_hook(lambda mod, args: calls.append(names[mod]))
        for mod in m.modules()
    ]
    try:
        m(tokens, doc_starts=starts)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_agreed_layouts_make_the_same_module_calls():
    m = mac("per_token")
    m.document_shortcut = False  # as on several ranks: rows of one document take no other path
    T = 24
    tokens = torch.randint(0, VOCAB, (2, T))
    sparse, dense = marks(T, [[], []]), marks(T, [[2, 4, 6, 9], [13]])
    assert module_calls(m, tokens, sparse) != module_calls(m, tokens, dense)  # each its own grid
    longest = max(m.blocks[0].documents_grid(tokens, None, s) for s in (sparse, dense))
    m.layout_agree = lambda n: longest  # the max over two ranks
    assert module_calls(m, tokens, sparse) == module_calls(m, tokens, dense)


def test_only_mac_asks_the_ranks():
    """The other blocks' calls do not depend on the layout: no collective for them."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant="mag", vocab_size=VOCAB, dim=32, depth=1, heads=4, window=6)
    m = TitansLM(cfg)
    m.layout_agree = lambda n: pytest.fail("asked")
    tokens = torch.randint(0, VOCAB, (2, 10))
    m(tokens, doc_starts=marks(10, [[4], []]))


def test_a_grid_off_the_segment_is_refused():
    m = mac("per_token")
    m.layout_agree = lambda n: n + 1
    with pytest.raises(ValueError, match=f"grid=.* is not a multiple of segment_len={C}"):
        m(torch.randint(0, VOCAB, (1, 10)), doc_starts=marks(10, [[4]]))


def test_max_over_ranks_without_a_group_is_the_value():
    assert distributed.max_over_ranks(5) == 5
