"""synthetic.generate(cut=...): at L = 128 a pass-key haystack is one noise paragraph, so
between sentences (RULER's layout, the default) every needle of depth < 0.5 sits at token 0;
cut="token" spreads the needles over the depth range, and the examples stay valid."""

import pytest

from titans_train.synthetic import SUITES, check_answers, generate


def enc(s: str) -> list[int]:
    return list(s.encode())


def dec(ids: list[int]) -> str:
    return bytes(ids).decode()


def needle_at(ex) -> int:
    return round(ex.depth * len(ex.tokens))


def test_between_sentences_a_short_pass_key_sits_at_token_0():
    assert {needle_at(e) for e in generate("passkey", 128, 32, enc, depth=(0.0, 0.5))} == {0}


@pytest.mark.parametrize("suite", SUITES)
def test_a_token_cut_spreads_the_needles_and_keeps_the_examples_valid(suite):
    length = 256 if suite == "uuid" else 128
    kw = dict(depth=(0.0, 0.5), pairs=2)
    examples = generate(suite, length, 32, enc, cut="token", **kw)
    room = max(needle_at(e) for e in examples)
    assert len({needle_at(e) for e in examples}) > 5 and room > 5, suite
    for ex in examples:
        assert len(ex.tokens) == length and all(check_answers(ex, dec)), suite
        key, value = ex.needles[0]
        assert value in dec(ex.tokens[needle_at(ex) :]), suite
    # the default is unchanged by the option's existence (same draws, same examples)
    same = generate(suite, length, 4, enc, cut="sentence", **kw)
    assert [e.tokens for e in same] == [e.tokens for e in generate(suite, length, 4, enc, **kw)]


def test_the_needle_sits_at_the_drawn_token():
    """With a depth range of one point the needle is that share of the haystack in."""
    ex = generate("passkey", 512, 1, enc, depth=(0.25, 0.25), cut="token")[0]
    text = dec(ex.tokens)
    at = text.index("The pass key is")
    assert at == needle_at(ex) > 0
    haystack = (
        len(ex.tokens)
        - (len(text) - text.index("\nWhat is"))
        - len(
            f"The pass key is {ex.needles[0][1]}. Remember it. {ex.needles[0][1]} is the pass key. "
        )
    )
    assert at == round(0.25 * haystack)


def test_an_unknown_cut_is_named():
    with pytest.raises(ValueError, match="unknown cut 'word'"):
        generate("passkey", 128, 1, enc, cut="word")
