"""The study's data: the embedded corpus and the recall examples (pass-key and MQAR, facts
beyond the window), as shards. Imported by ``study.py``, whose ``--smoke`` builds them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_pipelines import demo, tokenize
from data_pipelines.examples import answer_mask, write_examples
from titans_train.synthetic import NOISE, generate


def enc(s: str) -> list[int]:
    """The study's tokenizer: bytes."""
    return list(s.encode())


def recall_examples(
    seq_len: int, count: int, seed: int, mqar_share: float = 0.2, phase: bool = False
) -> list:
    """Passkey and MQAR examples of exactly seq_len tokens (bytes); facts beyond depth x window.
    A ``mqar_share`` of them (rounded to 1/1000) is MQAR with 4 pairs, the rest passkey;
    ``phase``: the pass-key haystacks start at a random point of the noise paragraph."""

    # Mostly passkey: in probes at this size full attention learned it in ~1,800 steps of 16
    # sequences, while MQAR was not learned in 2,000 steps by any model (docs/results.md).
    n_pk = count * round((1 - mqar_share) * 1000) // 1000
    docs = generate("passkey", seq_len, n_pk, enc, seed=seed, depth=(0.0, 0.4), phase=phase)
    docs += generate("mqar", seq_len, count - n_pk, enc, seed=seed, depth=(0.0, 0.3), pairs=4)
    return docs


def noise(rng: random.Random, n: int) -> list[int]:
    """n tokens (bytes) of the pass-key haystack's noise paragraph from a random point in it."""
    start = rng.randrange(len(NOISE))
    return list((NOISE * (2 + n // len(NOISE)))[start : start + n].encode())


def burn_in_rows(
    examples: list, burn_in: int, seed: int, fresh: float = 0.0
) -> tuple[list, list, list]:
    """Each example after ``burn_in`` tokens that the trainer runs without gradient
    (``train.burn_in``): r ~ U{0..burn_in} tokens of haystack noise in the example's own
    document, before them filler noise as a document of its own (the memory restarts after it
    under document masking). So each trained part starts from a memory that has absorbed
    0..burn_in tokens of haystack without needles, as benchmarks/probe_carry.py's haystack arm
    (docs/results.md). A share ``fresh`` of them starts its example on an empty memory (used
    = 0: all filler), as at test time. Returns tokens, loss masks (answers only) and document
    starts."""
    rows, masks, starts = [], [], []
    for i, ex in enumerate(examples):
        rng = random.Random(f"study-burn-in:{seed}:{i}")
        used = 0 if fresh and rng.random() < fresh else rng.randint(0, burn_in)
        filler = burn_in - used
        rows.append(noise(rng, filler) + noise(rng, used) + list(ex.tokens))
        masks.append([False] * burn_in + answer_mask(ex).tolist())
        starts.append([filler] if filler else [])
    return rows, masks, starts


def far_needles(seq_len: int, burn_in: int, count: int, seed: int) -> list:
    """Pass-key examples of burn_in + seq_len tokens whose needle lies anywhere in the first
    burn_in tokens (cut at a token): the trainer runs it without gradient, so what the loss on
    the answer trains is reading the needle back and not letting the last seq_len tokens of
    haystack overwrite it (their gates get the gradient), over distances of seq_len to
    burn_in + seq_len tokens. The needle's own write is trained by the other rows."""
    total = burn_in + seq_len
    depth = (0.0, burn_in / total)
    return generate("passkey", total, count, enc, seed=seed, depth=depth, cut="token")


def recall_documents(seq_len: int, count: int, seed: int, mqar_share: float = 0.2) -> list[str]:
    return [bytes(d.tokens).decode() for d in recall_examples(seq_len, count, seed, mqar_share)]


def build_data(
    out: Path,
    seq_len: int,
    recall_docs: int,
    corpus_mb: float = 4.0,
    answer_loss: bool = False,
    mqar_share: float = 0.2,
    phase: bool = False,
    burn_in: int = 0,
    far_share: float = 0.0,
    fresh_share: float = 0.0,
) -> tuple[Path, Path]:
    """The corpus and recall shards. ``answer_loss``: the recall examples carry loss on their
    answers only (shard loss masks, data_pipelines/examples.py), in the same samples and order
    as the text path gives (one example plus EOS per sample, the same seeded split).
    ``burn_in`` (needs ``answer_loss``): rows of burn_in + seq_len tokens, the examples of
    seq_len tokens at their end (``burn_in_rows``), the corpus in rows of that length; and a
    ``far_share`` of the recall rows pass-key examples of the whole row whose needle lies in the
    burn-in (``far_needles``)."""
    corpus = out / "data" / "corpus"
    demo.build_demo(str(corpus), seq_len=seq_len + burn_in, max_mb=corpus_mb, progress=False)
    recall = out / "data" / "recall"
    if (recall / "manifest.json").is_file():
        return corpus, recall
    if burn_in:
        n_far = round(far_share * recall_docs)
        examples = recall_examples(seq_len, recall_docs - n_far, 1, mqar_share, phase)
        rows, masks, starts = burn_in_rows(examples, burn_in, 1, fresh_share)
        far = far_needles(seq_len, burn_in, n_far, 1)
        rows += [ex.tokens for ex in far]
        masks += [answer_mask(ex) for ex in far]
        starts += [[]] * len(far)
        write_examples(
            str(recall), rows, masks, samples_per_shard=256, val_fraction=0.05, seed=0,
            starts=starts,
        )  # fmt: skip
        return corpus, recall
    if answer_loss:
        examples = recall_examples(seq_len, recall_docs, 1, mqar_share, phase)
        write_examples(
            str(recall), [e.tokens for e in examples], [answer_mask(e) for e in examples],
            samples_per_shard=256, val_fraction=0.05, seed=0,
        )  # fmt: skip
        return corpus, recall
    source = out / "data" / "recall.jsonl"
    with open(source, "w") as f:
        for text in recall_documents(seq_len, recall_docs, 1, mqar_share):
            f.write(json.dumps({"text": text}) + "\n")
    cfg = tokenize.TokenizeConfig(
        sources=[str(source)], out=str(recall), seq_len=seq_len, samples_per_shard=256,
        val_fraction=0.05, seed=0, progress=False,
    )  # fmt: skip
    tokenize.run(cfg)
    return corpus, recall
