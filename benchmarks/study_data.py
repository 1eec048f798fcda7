"""The study's data: the embedded corpus and the recall examples (pass-key and MQAR, facts
beyond the window), as shards. Imported by ``study.py``, whose ``--smoke`` builds them."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipelines import demo, tokenize
from data_pipelines.examples import answer_mask, write_examples
from titans_train.synthetic import generate


def recall_examples(
    seq_len: int, count: int, seed: int, mqar_share: float = 0.2, phase: bool = False
) -> list:
    """Passkey and MQAR examples of exactly seq_len tokens (bytes); facts beyond depth x window.
    A ``mqar_share`` of them (rounded to 1/1000) is MQAR with 4 pairs, the rest passkey;
    ``phase``: the pass-key haystacks start at a random point of the noise paragraph."""

    def enc(s: str) -> list[int]:
        return list(s.encode())

    # Mostly passkey: in probes at this size full attention learned it in ~1,800 steps of 16
    # sequences, while MQAR was not learned in 2,000 steps by any model (docs/results.md).
    n_pk = count * round((1 - mqar_share) * 1000) // 1000
    docs = generate("passkey", seq_len, n_pk, enc, seed=seed, depth=(0.0, 0.4), phase=phase)
    docs += generate("mqar", seq_len, count - n_pk, enc, seed=seed, depth=(0.0, 0.3), pairs=4)
    return docs


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
) -> tuple[Path, Path]:
    """The corpus and recall shards. ``answer_loss``: the recall examples carry loss on their
    answers only (shard loss masks, data_pipelines/examples.py), in the same samples and order
    as the text path gives (one example plus EOS per sample, the same seeded split)."""
    corpus = out / "data" / "corpus"
    demo.build_demo(str(corpus), seq_len=seq_len, max_mb=corpus_mb, progress=False)
    recall = out / "data" / "recall"
    if (recall / "manifest.json").is_file():
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
