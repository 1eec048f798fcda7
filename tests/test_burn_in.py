"""train.burn_in: each row's first B inputs run without gradient, the rest trains from their
state (validation.forward_rows). The 2-rank ZeRO-2 step against the plain module is
tests/test_loss_mask.py::test_two_ranks_with_a_burn_in_train_the_rest_of_each_row."""

import pytest
import torch
from doc_helpers import marks
from trainer_helpers import EXPERIMENT, base_overrides, in_process_trainer, losses, metrics

from titans_train.config_load import ConfigError, load_config
from titans_train.data.loader import MicroBatch
from titans_train.models import ModelConfig, TitansLM
from titans_train.validation import forward_rows, loss_targets, loss_tokens

VOCAB = 50


def tiny(variant: str) -> TitansLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant=variant, vocab_size=VOCAB, dim=16, depth=2, heads=2, window=4, segment_len=4,
        chunk_size=2, num_persistent=2,
    )  # fmt: skip
    return TitansLM(cfg).double()


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "transformer"])
def test_the_loss_is_the_whole_rows_on_the_targets_after_the_burn_in(variant):
    """Documents start on both sides of the split (row 0 at 5, row 1 at 13): the state and the
    document starts carry across it, so the loss is that of one call over the whole rows."""
    tokens = torch.randint(0, VOCAB, (2, 23))
    starts = marks(23, [[0, 5], [0, 13]])
    mask = torch.rand(2, 23) < 0.5
    mb = MicroBatch(tokens, starts, None, mask)
    m = tiny(variant)
    targets = loss_targets(mb, tokens).index_fill(1, torch.arange(9), -100)
    with torch.no_grad():
        whole = m(tokens[:, :-1], targets=targets, doc_starts=starts[:, :-1]).loss
        split = forward_rows(m, mb, burn_in=9).loss
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)  # the loss is taken in fp32
    assert loss_tokens(mb, 9) == int(mask[:, 10:].sum()) < loss_tokens(mb)


def test_no_gradient_reaches_the_burn_in():
    """A token that occurs only in the burn-in gets no embedding gradient; in one call it does
    (through attention and the memory's writes)."""
    tokens = torch.randint(1, VOCAB, (2, 21))
    tokens[:, 2] = 0  # token 0 only at position 2, inside an 8-token burn-in
    mb = MicroBatch(tokens, None, None)
    for burn_in, reaches in ((0, True), (8, False)):
        m = tiny("mag")
        forward_rows(m, mb, burn_in).loss.backward()
        assert bool(m.embed.weight.grad[0].abs().sum() > 0) == reaches, burn_in


@pytest.mark.parametrize("value", ["-1", "128"])
def test_a_burn_in_outside_the_row_names_the_key(value, tmp_path):
    overrides = base_overrides(tmp_path, tmp_path / "run", 2) + [f"train.burn_in={value}"]
    with pytest.raises(ConfigError, match=r"train\.burn_in.*train\.seq_len=128"):
        load_config(EXPERIMENT, overrides)


def test_a_run_with_a_burn_in_trains_and_validates(demo_shards, process_group, tmp_path):
    """The trainer end to end (one process, ZeRO as the experiment sets it): with a burn-in of 96
    of 128 tokens the loss is on the last 32 targets, so it differs from the whole row's, in
    training and in validation, and the run still learns."""
    common = ["train.eval_interval=6", "train.eval_batches=1", "optim.lr=3e-3"]
    for name, burn_in in (("whole", 0), ("burn", 96)):
        in_process_trainer(
            demo_shards, tmp_path / name, 6, *common, f"train.burn_in={burn_in}",
            process_group=process_group,
        ).fit()  # fmt: skip
    whole, burn = losses(tmp_path / "whole"), losses(tmp_path / "burn")
    assert burn[1] != whole[1] and burn[6] < burn[1], (whole, burn)
    val = [
        [m["val/loss"] for m in metrics(tmp_path / r) if "val/loss" in m] for r in ("whole", "burn")
    ]
    assert val[0] and val[1] and val[0] != val[1], val
