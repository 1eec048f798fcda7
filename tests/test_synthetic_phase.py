"""synthetic.generate(phase=True): pass-key haystacks start at a random point of the noise
paragraph (a training-data option); the default keeps RULER's layout (the paragraph's start)."""

from titans_train.synthetic import NOISE, check_answers, generate


def enc(s: str) -> list[int]:
    return list(s.encode())


def dec(ids: list[int]) -> str:
    return bytes(ids).decode()


def test_default_haystack_starts_at_the_paragraph():
    for ex in generate("passkey", 256, 8, enc, depth=(0.5, 1.0)):
        assert dec(ex.tokens).startswith(NOISE[:40])


def test_phase_starts_anywhere_and_keeps_the_example_valid():
    plain = generate("passkey", 256, 16, enc, depth=(0.5, 1.0))
    shifted = generate("passkey", 256, 16, enc, depth=(0.5, 1.0), phase=True)
    starts = set()
    for ex in shifted:
        text = dec(ex.tokens)
        assert len(ex.tokens) == 256 and all(check_answers(ex, dec))
        head = text[:20]
        assert head in NOISE + NOISE  # a slice of the repeated paragraph
        starts.add((NOISE + NOISE).index(head))
    assert len(starts) > 8  # many phases, not one
    assert [e.tokens for e in shifted] != [e.tokens for e in plain]
    assert generate("passkey", 256, 16, enc, depth=(0.5, 1.0), phase=True)[3].tokens == (
        shifted[3].tokens
    )  # still a function of the seed
