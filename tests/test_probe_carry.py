"""``train_recall(carry=K)`` (truncated BPTT over the batch rows' streams) and
benchmarks/probe_carry.py: carry 0 is the old loop exactly; carry K passes each step's detached
state to the next and drops it every K steps; the CLI runs."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_carry as PC  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402
from titans_train.synthetic import NOISE, generate  # noqa: E402
from titans_train.testing.recall_training import (  # noqa: E402
    WORD_VOCAB_SIZE,
    batch_tensors,
    examples,
    far_rows,
    haystack_state,
    train_recall,
    word_encode,
)

L = 64
CFG = ModelConfig(
    vocab_size=WORD_VOCAB_SIZE, dim=16, depth=1, heads=2, num_persistent=2,
    variant="mag", window=8, chunk_size=8, memory_max_lr=0.5,
)  # fmt: skip


def reference(
    steps: int, carry: int, carry_from: int = 0, lr: float = 3e-3
) -> tuple[list[float], list[int]]:
    """The loop written out: (answer loss per step, the state position each step starts at)."""
    torch.manual_seed(0)
    model = TitansLM(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    data = examples("passkey", L, steps * 2, 1000, (0.0, 1.0))
    losses, starts, state = [], [], None
    for step in range(steps):
        x, y = batch_tensors(data[step * 2 : (step + 1) * 2])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        if step < carry_from or (carry and (step - carry_from) % carry == 0):
            state = None
        starts.append(0 if state is None else state.pos)
        out = model(x, targets=y, state=state)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        state = out.state.detach() if carry else None
    return losses, starts


def test_carry_0_is_the_old_loop_and_carry_k_passes_the_state():
    old, starts = reference(4, carry=0)
    assert starts == [0, 0, 0, 0]
    assert train_recall(CFG, "passkey", L, steps=4, batch=2).losses == old
    assert train_recall(CFG, "passkey", L, steps=4, batch=2, carry=0).losses == old

    ref, starts = reference(5, carry=2)
    assert starts == [0, L - 1, 0, L - 1, 0]  # the stream goes on, then is dropped every K
    got = train_recall(CFG, "passkey", L, steps=5, batch=2, carry=2).losses
    assert got == ref
    # the first step is the same; the second sees a used memory, so its loss differs
    assert got[0] == old[0] and abs(got[1] - old[1]) > 1e-4

    ref, starts = reference(5, carry=2, carry_from=2)  # the curriculum: fresh, then streams
    assert starts == [0, 0, 0, L - 1, 0]
    assert train_recall(CFG, "passkey", L, steps=5, batch=2, carry=2, carry_from=2).losses == ref


def test_the_carried_state_is_detached():
    """The gradient spans one step: backward from step 2 does not reach step 1's graph."""
    torch.manual_seed(0)
    model = TitansLM(CFG)
    x, y = batch_tensors(examples("passkey", L, 2, 0, (0.0, 1.0)))
    state = model(x, targets=y).state.detach()
    mems = [b.mem for b in state.blocks]
    leaves = [t for m in mems for t in [*m.weights, *m.momentum, *(m.buffer or ()), m.conv_tail]]
    assert leaves and not any(t.requires_grad for t in leaves)
    assert all(m.weights[0].shape[0] == 2 * CFG.heads for m in mems)  # each row its own memory
    model(x, targets=y, state=state).loss.backward()  # would raise if step 1's graph were kept


def test_the_haystack_state_is_streamed_haystack():
    """``haystack=H``: a state of n ~ U{0..H} pieces of the noise paragraph, as streaming the
    same tokens would give; it changes the training losses; it excludes carry."""
    torch.manual_seed(0)
    model = TitansLM(CFG)
    gen, seen = torch.Generator().manual_seed(3), set()
    for _ in range(12):
        state = haystack_state(model, gen, 2, L - 1, 3)
        seen.add(0 if state is None else state.pos)
    assert seen == {0, L - 1, 2 * (L - 1), 3 * (L - 1)}
    gen = torch.Generator().manual_seed(3)
    n = int(torch.randint(0, 4, (1,), generator=gen))  # the same draws as haystack_state's
    start = int(torch.randint(0, len(word_encode(NOISE)), (2,), generator=gen)[0])
    tokens = torch.tensor(word_encode(NOISE * 20)[start : start + n * (L - 1)])[None]
    state = haystack_state(model, torch.Generator().manual_seed(3), 2, L - 1, 3)
    with torch.no_grad():
        want = model(tokens).state.blocks[0].mem.weights[0]
    assert n > 0 and torch.allclose(state.blocks[0].mem.weights[0][: CFG.heads], want, atol=1e-5)
    plain = train_recall(CFG, "passkey", L, steps=3, batch=2).losses
    hay = train_recall(CFG, "passkey", L, steps=3, batch=2, haystack=3).losses
    assert hay != plain
    with pytest.raises(ValueError, match="exclusive"):
        train_recall(CFG, "passkey", L, steps=1, batch=2, carry=2, haystack=3)


def test_far_rows_put_the_needle_in_the_burn_in():
    """``far_rows``: pass-key examples of burn_in + L tokens whose needle starts in the burn-in,
    split into the burn-in and the trained part, whose targets are the answer digits only."""
    burn_in = 2 * (L - 1)
    prefix, x, y = far_rows(burn_in, L, 6, seed=5)
    assert (prefix.shape, x.shape, y.shape) == ((6, burn_in), (6, L - 1), (6, L - 1))
    exs = generate(
        "passkey",
        burn_in + L,
        6,
        word_encode,
        seed=5,
        depth=(0, burn_in / (burn_in + L)),
        cut="token",
    )
    for row, ex in enumerate(exs):
        assert torch.cat([prefix[row], x[row]]).tolist() == ex.tokens[:-1]
        assert int(ex.depth * len(ex.tokens)) < burn_in  # the needle starts in the burn-in
        value = word_encode(ex.needles[0][1])
        assert y[row][y[row] != -100].tolist() == value
    assert len({ex.depth for ex in exs}) == 6  # anywhere in it


def test_far_needles_change_the_training_and_need_a_haystack():
    hay = train_recall(CFG, "passkey", L, steps=4, batch=2, haystack=2).losses
    far = train_recall(CFG, "passkey", L, steps=4, batch=2, haystack=2, far=0.5).losses
    assert far != hay
    for bad in (dict(far=0.5), dict(haystack=2, far=1.5), dict(haystack=2, far=0.5, suite="mqar")):
        kw = dict(suite="passkey") | bad
        with pytest.raises(ValueError, match="far="):
            train_recall(CFG, kw.pop("suite"), L, steps=1, batch=2, **kw)


def test_smoke_cli(tmp_path):
    out = tmp_path / "c.json"
    rows = PC.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["variant"], r["carry"]) for r in rows] == [
        ("mag", 0), ("mag", 2), ("mac-input", 0), ("mac-input", 2),
    ]  # fmt: skip
    for r in rows:
        assert set(r["scores"]) == {"64", "128"}
        assert all(0 <= s["exact"] <= 100 and 0 <= s["digits"] <= 100 for s in r["scores"].values())
    assert rows[0]["loss_last50"] != rows[1]["loss_last50"]  # step 2 saw a carried state


def test_cli_far_arm(tmp_path):
    """``--haystack H --far F``: the haystack arm trains with far needles and says so; --far
    alone is refused by name."""
    argv = ["--variants", "mal-0.5", "--carry", "0", "--carry-from", "1", "--haystack", "2"]
    argv += ["--far", "0.5", "--steps", "3", "--seeds", "0", "--mults", "1", "--count", "2"]
    rows = PC.main(argv)
    assert [(r["carry"], r["haystack"], r["far"]) for r in rows] == [(0, 0, 0.0), (0, 2, 0.5)]
    assert PC.arm_name(rows[1]) == "haystack 2, far 0.5 from step 1"
    assert rows[0]["loss_last50"] != rows[1]["loss_last50"]
    with pytest.raises(SystemExit, match="--far 0.5 needs --haystack"):
        PC.main(["--far", "0.5", "--steps", "1"])
