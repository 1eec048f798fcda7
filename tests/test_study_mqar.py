"""benchmarks/study_mqar.py: MQAR scored per candidate value agrees with titans-eval's exact
match, and its value mass is the probability of the example's values."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study_mqar as Q  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402
from titans_train.recall import score  # noqa: E402
from titans_train.synthetic import generate  # noqa: E402

CFG = dict(vocab_size=320, dim=32, depth=1, heads=2, window=16, segment_len=16, chunk_size=8)


def enc(s: str) -> list[int]:
    return list(s.encode())


def test_scores_agree_with_titans_eval():
    torch.manual_seed(0)
    model = TitansLM(ModelConfig(variant="mag", **CFG)).double().eval()
    with torch.no_grad():  # make the model predict something: copy the input token
        model.head.weight.copy_(model.embed.weight * 30)
    examples = generate("mqar", 64, 4, enc, seed=1, pairs=2)
    for ex in examples[:2]:  # make the first answer what the model predicts: an exact hit
        a, b = ex.answers[0]
        for k in range(a, b):
            with torch.no_grad():
                logits = model(torch.tensor([ex.tokens])).logits[0]
            ex.tokens[k] = int(logits[k - 1].argmax())
    ours = [a for ex in examples for a in Q.score_example(model, ex, 32)]
    exact, _ = score(model, examples, 32)
    assert [a["exact"] for a in ours] == exact and sum(exact) >= 2
    for a in ours:  # exact match is a hit on the first token and on every later one
        assert a["exact"] == (a["first_token"] and a["later_tokens"] == 1.0)
    assert ours[0]["first_token"] and ours[0]["later_tokens"] == 1.0
    summary = Q.summarize(ours)
    assert summary["first_token"] >= summary["exact"] and summary["later_tokens"] is not None
    ex = examples[0]
    (a, b), values = ex.answers[0], Q.candidates(ex)
    total = 0.0
    for v in values:  # the probability of each value in the first answer's place, directly
        t = torch.tensor([ex.tokens[:a] + v + ex.tokens[b:]])
        with torch.no_grad():
            logp = model(t).logits.log_softmax(-1)[0]
        total += float(sum(logp[k - 1, t[0, k]] for k in range(a, b)).exp())
    assert abs(ours[0]["value_mass"] - total) < 1e-6  # scored in float32
    assert all(a["choices"] == len(values) for a in ours[:2])


def test_every_answer_knows_its_query_and_the_values_still_unasked():
    examples = generate("mqar", 64, 4, enc, seed=1, pairs=2)
    model = TitansLM(ModelConfig(variant="mag", **CFG)).eval()
    for ex in examples:
        rows = Q.score_example(model, ex, 32)
        assert [r["query"] for r in rows] == list(range(len(ex.answers)))
        assert rows[-1]["unasked"] == 1
        assert rows[0]["unasked"] == len(Q.candidates(ex)) == rows[0]["choices"]


def test_the_elimination_shortcut_is_told_apart_from_recall():
    """A model that knows the values but no binding, and picks among those not yet answered at
    random, reaches key choice ~ elimination (52 % at 4 pairs) but only 1/P on first queries;
    one that recalls is at 100 % on both."""
    import random

    rng = random.Random(0)
    shortcut, recall = [], []
    for _ in range(4000):
        for i in range(4):
            row = dict(exact=False, value_mass=1.0, choices=4, query=i, unasked=4 - i)
            shortcut.append({**row, "key_choice": rng.randrange(4 - i) == 0})
            recall.append({**row, "exact": True, "key_choice": True})
    s, r = Q.summarize(shortcut), Q.summarize(recall)
    assert abs(s["elimination"] - (1 / 4 + 1 / 3 + 1 / 2 + 1) / 4) < 1e-12
    assert abs(s["key_choice"] - s["elimination"]) < 0.02 and abs(s["plateau"] - 0.25) < 1e-12
    assert abs(s["key_choice_first"] - 0.25) < 0.03
    assert r["key_choice"] == r["key_choice_first"] == r["exact"] == 1.0 and r["answers"] == 16000
