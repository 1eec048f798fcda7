"""Loss on some tokens only (issue 15 item 3, MQAR as in Zoology): the shards' optional
loss_mask member, written by data_pipelines/examples.py, carried by the loader through rank
splits and resume, and turned into ignored targets by the trainer and the validation loss."""

import os

import numpy as np
import pytest
import torch
from data_helpers import shards_from_corpus

from data_pipelines.examples import answer_mask, write_examples
from titans_train.data import DataError, StreamingLoader
from titans_train.data.manifest import ShardManifest
from titans_train.data.shard_format import (
    LOSS_MASK_FIELD,
    ShardRef,
    crc_record,
    encode_sample,
    read_shard,
    sample_crc,
)
from titans_train.synthetic import generate
from titans_train.validation import loss_targets

T = 64


def enc(s: str) -> list[int]:
    return list(s.encode())


@pytest.fixture(scope="module")
def mqar(tmp_path_factory):
    """40 MQAR examples of 64 tokens (2 pairs) written with their answer masks (10 % val)."""
    out = tmp_path_factory.mktemp("mqar") / "shards"
    examples = generate("mqar", T, 40, enc, seed=3, pairs=2)
    masks = [answer_mask(e) for e in examples]
    write_examples(str(out), [e.tokens for e in examples], masks, samples_per_shard=8,
                   val_fraction=0.1)  # fmt: skip
    by_tokens = {bytes(e.tokens): m for e, m in zip(examples, masks)}
    return out, by_tokens


def loader(path, **kw) -> StreamingLoader:
    args = dict(seq_len=T, vocab_size=320, global_batch=8, micro_batch=2, seed=1)
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    return StreamingLoader(paths, **{**args, **kw})


def check_rows(mb, by_tokens) -> None:
    """Each row's mask is its example's answers (EOS carries none), and the targets keep
    exactly those tokens."""
    assert mb.loss_mask is not None and mb.loss_mask.dtype == torch.bool
    targets = loss_targets(mb, mb.tokens)
    for row, mask, tgt in zip(mb.tokens.numpy(), mb.loss_mask.numpy(), targets.numpy()):
        want = by_tokens[bytes(row[:T].astype(np.uint8))]
        np.testing.assert_array_equal(mask, np.append(want, False))
        np.testing.assert_array_equal(tgt != -100, want[1:].tolist() + [False])
        np.testing.assert_array_equal(tgt[tgt != -100], row[1:][tgt != -100])


def test_answer_mask_is_the_answers():
    ex = generate("mqar", T, 1, enc, pairs=2)[0]
    mask = answer_mask(ex)
    assert mask.sum() == sum(b - a for a, b in ex.answers) == 4
    answers = bytes(np.array(ex.tokens, dtype=np.uint8)[mask]).decode()
    assert answers == "".join(v for _, v in ex.needles)


def test_loader_carries_masks_on_every_rank(mqar):
    path, by_tokens = mqar
    for rank in (0, 1):
        with loader(path, rank=rank, world_size=2, micro_batch=2) as ld:
            for _ in range(6):  # past the first epoch (36 train samples, 4 per rank per step)
                for mb in ld.next_step():
                    check_rows(mb, by_tokens)


def test_resumed_loader_gives_the_same_masks(mqar):
    path, _ = mqar
    with loader(path) as a:
        a.next_step()
        state = a.state_dict()
        want = a.next_step()
    with loader(path) as b:
        b.load_state_dict(state)
        got = b.next_step()
    for x, y in zip(want, got):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.loss_mask, y.loss_mask)


def test_shards_without_mask_load_and_mix(mqar, tmp_path):
    """Shards from tokenize (no member) give loss_mask None; mixed with masked data, their
    rows carry loss on every token."""
    path, by_tokens = mqar
    plain = shards_from_corpus(str(tmp_path), "plain", 24, seq_len=T, samples_per_shard=8)
    m = ShardManifest.load(plain)
    shard = m.shards("train")[0]
    ref = ShardRef(m.url(shard), shard.name, shard.samples, shard.sha256, T + 1, m.dtype, 320)
    assert read_shard(ref).loss_bits is None
    with loader(plain) as ld:
        assert all(mb.loss_mask is None for mb in ld.next_step())
    with loader([plain, str(path)], weights=[0.5, 0.5], micro_batch=8) as ld:
        (mb,) = ld.next_step()
    src = mb.sample_ids[:, 0]
    assert 0 < int((src == 1).sum()) < 8
    assert mb.loss_mask[src == 0].all()
    for row, mask in zip(mb.tokens[src == 1].numpy(), mb.loss_mask[src == 1].numpy()):
        np.testing.assert_array_equal(mask[:T], by_tokens[bytes(row[:T].astype(np.uint8))])


def test_crc_covers_the_mask():
    tokens = np.arange(T + 1, dtype=np.uint16)
    plain = encode_sample("k", tokens, np.zeros(0))
    assert LOSS_MASK_FIELD not in encode_sample("k", tokens, np.zeros(0), np.ones(T + 1, bool))
    mask = np.zeros(T + 1, bool)
    mask[5] = True
    masked = encode_sample("k", tokens, np.zeros(0), mask)
    mask[6] = True
    other = encode_sample("k", tokens, np.zeros(0), mask)
    assert sample_crc(plain) != sample_crc(masked) != sample_crc(other)


def test_mask_of_the_wrong_length_is_refused(tmp_path):
    import webdataset as wds

    tokens = np.arange(T + 1, dtype=np.uint16)
    sample = encode_sample("s-000000", tokens, np.zeros(0), np.arange(T + 1) % 2 == 0)
    sample[LOSS_MASK_FIELD] = sample[LOSS_MASK_FIELD][:-1]
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path), encoder=False) as w:
        w.write(crc_record([sample]))
        w.write(sample)
    ref = ShardRef(str(path), "bad.tar", 1, "", T + 1, "uint16", 320, crc=True)
    with pytest.raises(DataError, match=r"8 loss_mask.u8 bytes, expected 9"):
        read_shard(ref)


@pytest.mark.parametrize(
    "examples,masks,message",
    [
        ([[1, 2, 3]], [[True, False]], "one length"),
        ([[1, 2, 300]], [[True, True, False]], r"token ids must lie in \[0, 257\)"),
        ([[1, 2, 3]], [[False] * 3], "example 0: no token carries loss"),
        ([], [], "need as many, > 0"),
    ],
)
def test_write_examples_bad_input(tmp_path, examples, masks, message):
    with pytest.raises(ValueError, match=message):
        write_examples(str(tmp_path / "x"), examples, masks)
    assert not os.path.exists(tmp_path / "x" / "manifest.json")


@pytest.mark.parametrize(
    "starts,message",
    [
        ([[3]], "1 lists of document starts for 2 examples"),
        ([[3], [5, 5]], r"example 1: document starts \[5, 5\] must rise within \(0, 8\)"),
        ([[8], []], r"example 0: document starts \[8\] must rise"),
    ],
)
def test_write_examples_bad_document_starts(tmp_path, starts, message):
    with pytest.raises(ValueError, match=message):
        write_examples(str(tmp_path / "x"), [[1] * 8] * 2, [[True] * 8] * 2, starts=starts)
    assert not os.path.exists(tmp_path / "x" / "manifest.json")


def test_write_examples_with_several_documents_per_example(tmp_path):
    """Examples made of documents (filler, then the task): the shards hold the starts, the
    loader hands them to the model, the manifest counts the documents."""
    examples = [[i + 1] * 8 for i in range(10)]
    masks = [[False] * 7 + [True]] * 10
    starts = [[i % 7 + 1] if i % 2 else [] for i in range(10)]
    write_examples(str(tmp_path / "d"), examples, masks, samples_per_shard=4, val_fraction=0.2,
                   starts=starts)  # fmt: skip
    m = ShardManifest.load(str(tmp_path / "d"))
    counts = sum(m.data["splits"][s]["documents"] for s in ("train", "val"))
    assert counts == 15
    seen = 0
    for split in ("train", "val"):
        for shard in m.shards(split):
            ref = ShardRef(m.url(shard), shard.name, shard.samples, shard.sha256, 9, m.dtype, 257)
            data = read_shard(ref)
            for row in range(shard.samples):
                i = int(data.tokens[row, 0]) - 1
                assert data.doc_starts(row).tolist() == [0, *starts[i]], i
                seen += 1
    assert seen == 10


@pytest.mark.slow  # ~30-60 s: a 30-step run in this process
def test_trainer_puts_the_loss_on_the_answers_only(tmp_path):
    """Examples of random letters with a constant answer token ('Z') every 16th position, the
    loss on the answers only: the run learns 'Z' and its train and validation losses fall far
    below what any model could reach if the random letters carried loss (15/16 of the tokens
    at ln 25 = 3.2 nats: >= 3.0)."""
    from trainer_helpers import metrics, train_here

    rng = np.random.default_rng(0)
    examples = rng.integers(ord("a"), ord("z"), size=(96, 128))
    examples[:, 15::16] = ord("Z")
    masks = np.zeros(examples.shape, dtype=bool)
    masks[:, 15::16] = True
    write_examples(str(tmp_path / "data"), examples.tolist(), masks.tolist(), val_fraction=0.1)
    run = tmp_path / "run"
    ran = train_here(tmp_path / "data", run, 30, "train.eval_interval=30", "train.eval_batches=1")
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = metrics(run)
    last = [r["loss"] for r in rows if "loss" in r][-1]
    val = [r["val/loss"] for r in rows if "val/loss" in r][-1]
    assert last < 1.0 and val < 1.0, (last, val)


def test_write_examples_gives_tokenize_samples(tmp_path):
    """Examples of exactly seq_len tokens: the same samples, split and order as tokenize writes
    for them as text documents, so a study with the loss on the answers trains on the same
    tokens as one without."""
    import json

    from data_helpers import build, plain_read

    examples = generate("passkey", T * 2, 30, enc, seed=5)
    texts = [bytes(e.tokens).decode() for e in examples]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build(str(tmp_path / "text"), [str(tmp_path / "x.jsonl")], seq_len=2 * T,
          samples_per_shard=8, val_fraction=0.2)  # fmt: skip
    masks = [answer_mask(e) for e in examples]
    tokens = [e.tokens for e in examples]
    write_examples(str(tmp_path / "ex"), tokens, masks, samples_per_shard=8, val_fraction=0.2)
    for split in ("train", "val"):
        a, b = plain_read(str(tmp_path / "text"), split), plain_read(str(tmp_path / "ex"), split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_validation_runs_every_forward_even_without_loss_tokens():
    """Under ZeRO-3 a forward gathers parameters with collectives every rank must join, so a rank
    whose micro-batch has no target that carries loss still runs it (it once skipped it: the
    other ranks would wait forever). Its loss is left out of the mean."""
    from types import SimpleNamespace

    from titans_train.data.loader import MicroBatch
    from titans_train.validation import validation_loss

    class Counting(torch.nn.Module):
        calls = 0

        def forward(self, tokens, targets):
            self.calls += 1
            keep = targets != -100
            loss = torch.tensor(float("nan")) if not keep.any() else torch.tensor(2.0)
            return SimpleNamespace(loss=loss)

    tokens = torch.zeros(2, T + 1, dtype=torch.long)
    none = MicroBatch(tokens, None, torch.zeros(2, 3), torch.zeros(2, T + 1, dtype=torch.bool))
    some = MicroBatch(tokens, None, torch.zeros(2, 3), torch.ones(2, T + 1, dtype=torch.bool))
    model = Counting()
    out = validation_loss(model, [[none, some]], max_batches=0)
    assert model.calls == 2
    assert out["val/loss"] == pytest.approx(2.0)


class _Engine:
    """DeepSpeed's engine as train_step sees it: backward divides the loss by the accumulation
    steps (engine.backward, scale_wrt_gas), step at the end does nothing here."""

    skipped_steps = 0

    def __init__(self, model: torch.nn.Module, gas: int) -> None:
        self.model, self.gas = model, gas

    def __call__(self, tokens, targets):
        return self.model(tokens, targets=targets)

    def backward(self, loss) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        pass


def test_train_step_weighs_every_answer_alike():
    """Two micro-batches with 1 and 5 answers: the step's gradient and logged loss are the mean
    over the 6 answers (one forward over both), not the mean of the micro-batches' means, which
    gave the lone answer 5 times the weight of each other one (and, across ranks, made an
    answer's weight depend on the number of processes). Failed on the old train_step."""
    from types import SimpleNamespace

    from titans_train.data.loader import MicroBatch
    from titans_train.models import ModelConfig, TitansLM
    from titans_train.trainer import Trainer

    torch.manual_seed(0)
    cfg = ModelConfig(variant="transformer", vocab_size=64, dim=16, depth=1, heads=2, window=8)
    model = TitansLM(cfg).double()
    tokens = torch.randint(0, 64, (2, 2, 17))
    masks = torch.zeros(2, 2, 17, dtype=torch.bool)
    masks[0, 0, 5] = True
    masks[1, :, 3:8:2] = True
    masks[1, 1, 16] = True  # 1 answer in the first micro-batch, 3 + 2 in the second
    mbs = [MicroBatch(tokens[i], None, torch.zeros(2, 3), masks[i]) for i in range(2)]

    flat = MicroBatch(tokens.flatten(0, 1), None, torch.zeros(4, 3), masks.flatten(0, 1))
    want = model(flat.tokens[:, :-1], targets=loss_targets(flat, flat.tokens)).loss
    want.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    result = Trainer.train_step(SimpleNamespace(engine=_Engine(model, gas=2), burn_in=0), mbs)
    assert result.loss == pytest.approx(want.item(), rel=1e-6)  # all_mean reduces in fp32
    for name, grad in ref.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-10, atol=1e-12)


def test_step_loss_weights_are_exactly_one_without_masks():
    """Equal counts (every target carries loss) leave every loss as it was, bit for bit."""
    from titans_train.validation import step_loss_weights

    assert step_loss_weights([128, 128, 128]) == [1.0, 1.0, 1.0]
    assert step_loss_weights([1, 3, 0]) == [0.75, 2.25, 0.0]
    assert step_loss_weights([0, 0]) == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_weigh_every_answer_alike():
    """2 ranks x 2 micro-batches (ZeRO-2, a real engine) with 1, 6, 0 and 3 answers: the step's
    loss and parameter change are the plain module's on all 10 answers at once. It failed on the
    train_step before step_loss_weights (the mean of the micro-batches' means): loss 3.08
    against 4.08, parameter change off by 0.17 where the largest is 0.22."""
    from distributed import ROOT, torchrun

    proc = torchrun(ROOT / "tests" / "scripts" / "masked_step_parity.py", timeout=300)
    _check_parity(proc)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_a_burn_in_train_the_rest_of_each_row():
    """train.burn_in = 6 with MAG (a memory state handed across the split) on 2 ranks, ZeRO-2:
    the step is the plain module's with the first 6 inputs run without gradient, only answers
    after them count, and the loss is the whole rows' with those targets ignored."""
    from distributed import ROOT, torchrun

    script = ROOT / "tests" / "scripts" / "masked_step_parity.py"
    row = _check_parity(torchrun(script, "6", "mag", timeout=300))
    assert row["whole"] == pytest.approx(row["loss"], rel=1e-5), row
    assert 0 < row["answers"] < 10, row  # some of the 10 answers fell in the burn-in
    assert row["m0_grad"] > 0, row  # M_0, read after the burn-in on rank 1 only, reduced right


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "burn_in,variant,stage,extra",
    [
        ("0", "mag", "2", []),
        ("0", "mal", "3", []),
        ("0", "mac", "3", []),
        ("6", "mac", "3", ["mac_retrieval=memory_tokens"]),
    ],
)
def test_two_ranks_with_other_document_layouts_reduce_the_same_gradients(
    burn_in, variant, stage, extra
):
    """Rank 0's rows are one document each, rank 1's hold three more. Each rank once took its
    own path (the plain one for single documents), so their backwards produced gradients in
    other orders: ZeRO-2 reduced the wrong slices (MAG: off by 0.0035 where the largest is 0.07,
    seen with PARITY_SHORTCUT=1) and ZeRO-3 hung. trainer.same_graph_on_every_rank fixes it.
    MAC's documents grid has as many segments as the layout needs, so under ZeRO-3 rank 1 called
    its modules more often and the step failed a collective (SIGABRT, seen before
    TitansLM.layout_agree); with the burn-in, a segment of padding only then broke the memory."""
    from distributed import ROOT, torchrun

    script = ROOT / "tests" / "scripts" / "masked_step_parity.py"
    _check_parity(torchrun(script, burn_in, variant, stage, *extra, timeout=300))


def _check_parity(proc) -> dict:
    import json

    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1, proc.stdout
    row = rows[0]
    assert not row["skipped"], row
    assert row["loss"] == pytest.approx(row["want"], rel=1e-5), row
    assert row["grad_max"] > 1e-3, row  # the comparison below is not of zeros
    assert row["grad_diff"] < 1e-5 * max(1.0, row["grad_max"]), row
    return row
