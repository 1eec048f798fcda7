"""The synthetic recall suites: deterministic by seed, exact lengths, answers checkable against the
inserted needles; and recall scoring (one teacher-forced pass) equals greedy generation."""

import re

import pytest
import torch

from data_pipelines.tokenizer import load_tokenizer
from titans_train.models import ModelConfig, TitansLM
from titans_train.recall import score
from titans_train.synthetic import SUITES, Example, check_answers, generate

TOK = load_tokenizer("bytes")


def encode(text: str) -> list[int]:
    return TOK.encode_batch([text])[0].tolist()


def decode(ids) -> str:
    return TOK.decode(ids)


@pytest.mark.parametrize("suite", SUITES)
def test_deterministic_exact_length_and_checkable(suite):
    a = generate(suite, 700, 6, encode, seed=3, pairs=5)
    b = generate(suite, 700, 6, encode, seed=3, pairs=5)
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert [e.tokens for e in generate(suite, 700, 3, encode, seed=3, pairs=5)] == [
        e.tokens for e in a[:3]
    ]  # example i depends on i, not on the count
    other = generate(suite, 700, 6, encode, seed=4, pairs=5)
    assert [e.tokens for e in other] != [e.tokens for e in a]
    for ex in a:
        assert len(ex.tokens) == 700
        assert all(check_answers(ex, decode))
        assert ex.answers[-1][1] == 700  # the last answer ends the example
        text = decode(ex.tokens)
        context = decode(ex.tokens[: ex.answers[0][0]])
        for key, value in ex.needles:
            assert key in context
            # The value is stated in the context before it is asked for (MQAR as key:value).
            stated = f"{key}:{value}" if suite == "mqar" else value
            assert stated in context
        if suite == "mqar":
            assert len(ex.answers) == 5 and len({k for k, _ in ex.needles}) == 5
        else:
            assert len(ex.answers) == 1
            assert context.count(ex.needles[0][1]) == (2 if suite == "passkey" else 1)
        assert "\ufffd" not in text


def test_styles_and_depth():
    passkey = generate("passkey", 2000, 1, encode, seed=0)[0]
    assert "The grass is green." in decode(passkey.tokens)
    assert re.fullmatch(r"\d{5}", passkey.needles[0][1])
    number = generate("number", 2000, 1, encode, seed=0)[0]
    assert "The grass is green." not in decode(number.tokens)
    assert re.fullmatch(r"\d{7}", number.needles[0][1])
    uuid = generate("uuid", 2000, 1, encode, seed=0)[0]
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.needles[0][1]
    )
    shallow = generate("number", 2000, 10, encode, seed=1, depth=(0.0, 0.2))
    deep = generate("number", 2000, 10, encode, seed=1, depth=(0.8, 1.0))
    assert max(e.depth for e in shallow) < 0.25 and min(e.depth for e in deep) > 0.7


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        generate("nope", 100, 1, encode)
    with pytest.raises(ValueError, match="passkey: length 50 is too short"):
        generate("passkey", 50, 1, encode)
    with pytest.raises(ValueError, match="depth range"):
        generate("mqar", 500, 1, encode, depth=(0.5, 0.2))


def test_scoring_equals_greedy_generation():
    """Put the model's own greedy continuation in the answer slot: recalled. Change one of its
    tokens: not recalled. Checks the teacher-forced shortcut against model.generate."""
    torch.manual_seed(0)
    model = TitansLM(
        ModelConfig(
            variant="mac",
            vocab_size=260,
            dim=32,
            depth=2,
            heads=4,
            window=16,
            segment_len=16,
            chunk_size=8,
            num_persistent=2,
        )  # fmt: skip
    ).eval()
    base = generate("passkey", 120, 2, encode, seed=0)
    examples, flipped = [], []
    for ex in base:
        a, b = ex.answers[0]
        prompt = torch.tensor(ex.tokens[:a])
        greedy = model.generate(prompt, b - a, temperature=0.0)[a:].tolist()
        good = ex.tokens[:a] + greedy
        bad = good[:-1] + [(good[-1] + 1) % 256]
        examples.append(Example("passkey", good, [(a, b)], ex.needles, ex.depth))
        flipped.append(Example("passkey", bad, [(a, b)], ex.needles, ex.depth))
    for piece in (120, 7):  # one call, and pieces that carry the state
        exact, share = score(model, examples + flipped, piece=piece, batch_size=3)
        assert exact == [True, True, False, False]
        assert share[:2] == [1.0, 1.0] and all(s == pytest.approx(5 / 6) for s in share[2:])
