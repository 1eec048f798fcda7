"""The memory must be usable by training, not only correct: a tiny LMM learns to copy random
tokens in context (docs/memory.md, "Value scale"). Correctness tests cannot see an init that
makes the memory's writes too small to learn from; this one can."""

import math

import pytest
import torch
import torch.nn.functional as F

from titans_train.models import ModelConfig, TitansLM

STEPS, LIMIT = 600, 3.0


def copy_loss_after_training(steps: int, n: int = 8, vocab: int = 32) -> float:
    """Train on [a, a] for random a of n tokens; return the loss on the copied half."""
    torch.manual_seed(0)
    # 4 persistent tokens, not the default 128: the memory then runs over 19 tokens a row, not
    # 143, and the test takes a third of the time (37 against ~120 CPU s).
    cfg = ModelConfig(
        variant="lmm", vocab_size=vocab, dim=64, depth=2, heads=4, window=8, chunk_size=16,
        num_persistent=4,
    )  # fmt: skip
    model = TitansLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # when the copy is discovered depends on the thread count
    try:
        for step in range(steps):
            losses.append(train_step(model, opt, gen, step, n, vocab))
    finally:
        torch.set_num_threads(threads)
    return sum(losses[-50:]) / 50


def train_step(model, opt, gen, step: int, n: int, vocab: int) -> float:
    a = torch.randint(0, vocab, (16, n), generator=gen)
    x = torch.cat([a, a], 1)
    for group in opt.param_groups:
        group["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
    logits = model(x[:, :-1]).logits
    loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    opt.zero_grad()
    loss.mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss[:, n:].mean().item()


@pytest.mark.slow
def test_lmm_learns_to_copy_in_context():
    # Chance is ln 32 = 3.47 nats; copying 8 tokens back is out of the convolutions' reach (2
    # blocks x 4 taps), so only the memory can do it. Measured (1 thread, mean of the last 50
    # steps, 2026-12-01): after 600 steps 2.01 here (seed 0: torch.manual_seed(0), data seed 1);
    # with seeds 1-4 (model seed s, data seed s + 1) 0.94, 1.23, 1.82, 2.31. After 600 steps a
    # memory that never writes (max_lr = 0) stays at 3.47, and the old 0.02 init of W_QKV (too
    # small to write with) at 3.47: both fail the limit. (With the default 128 persistent
    # tokens it was 2.60 after 500 steps, at three times the cost.)
    loss = copy_loss_after_training(steps=STEPS)
    assert loss < LIMIT, (
        f"copy loss {loss:.3f} nats after {STEPS} steps (chance {math.log(32):.2f})"
    )
