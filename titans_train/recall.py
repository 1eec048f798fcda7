"""Scoring the synthetic recall suites (``synthetic.py``): greedy exact match, with carried state.

An answer counts as recalled when greedy decoding from the text before it produces exactly its
tokens. That equals checking, in one teacher-forced pass, that the argmax at every position of
the span predicts the next answer token (greedy emits the first token iff it is the argmax, and
then sees exactly the teacher-forced prefix), so an example costs one streamed forward however
many answers it has (MQAR asks every key). Token accuracy (the share of answer tokens predicted)
is reported beside it: it shows partial recall that exact match hides.
"""

from __future__ import annotations

import torch

from titans_train.models import TitansLM
from titans_train.perplexity import model_device, stream_logits
from titans_train.synthetic import Encode, Example, generate


def predictions(model: TitansLM, tokens: torch.Tensor, piece: int) -> torch.Tensor:
    """Greedy next-token predictions [B, T] of a batch, fed ``piece`` tokens at a time."""
    return torch.cat([logits.argmax(-1) for _, logits in stream_logits(model, tokens, piece)], 1)


def score(
    model: TitansLM, examples: list[Example], piece: int, batch_size: int = 8
) -> tuple[list[bool], list[float]]:
    """Per answer: exact match, and the share of its tokens predicted."""
    exact, token_share = [], []
    for i in range(0, len(examples), batch_size):
        group = examples[i : i + batch_size]
        tokens = torch.tensor([e.tokens for e in group], dtype=torch.long)
        tokens = tokens.to(model_device(model))
        pred = predictions(model, tokens, piece)
        for row, ex in enumerate(group):
            for a, b in ex.answers:
                hit = pred[row, a - 1 : b - 1] == tokens[row, a:b]
                exact.append(bool(hit.all()))
                token_share.append(hit.float().mean().item())
    return exact, token_share


def recall_suite(
    model: TitansLM,
    suite: str,
    lengths: list[int],
    encode: Encode,
    count: int,
    piece: int,
    seed: int = 0,
    depth: tuple[float, float] = (0.0, 1.0),
    pairs: int = 8,
    batch_size: int = 8,
    cut: str = "sentence",
) -> dict[int, dict]:
    """{length: {"accuracy", "token_accuracy", "answers", "examples"}} for one suite."""
    results = {}
    for length in lengths:
        examples = generate(
            suite, length, count, encode, seed=seed, depth=depth, pairs=pairs, cut=cut
        )
        exact, share = score(model, examples, piece, batch_size)
        results[length] = {
            "accuracy": sum(exact) / len(exact),
            "token_accuracy": sum(share) / len(share),
            "answers": len(exact),
            "examples": len(examples),
        }
    return results
