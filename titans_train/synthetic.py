"""Long-context recall tasks generated from a seed: S-NIAH in the three RULER styles, and MQAR.

Every example is built from text pieces, each encoded on its own with the model's tokenizer and
concatenated, so the answer tokens are exactly the tokens the model must produce. An example
has exactly ``length`` tokens (the haystack is cut to fit), so examples of one length batch
together and, written as ``length``-token documents, pack one per sample into training shards.

- ``passkey`` (RULER niah_single_1): a 5-digit pass key in a haystack of one repeated noise
  paragraph.
- ``number`` (niah_single_2): a 7-digit "special magic number" for a key in an essay-like
  haystack (sentences drawn from a small seeded grammar: no corpus is downloaded).
- ``uuid`` (niah_single_3, the paper's "W"): a uuid for a key word in the essay haystack.
- ``mqar`` (multi-query associative recall, Zoology): key:value pairs at the start, filler,
  then every key queried again in another order; each value is one answer.

The needle's depth is drawn uniformly from ``depth`` (a fraction of the haystack before the
needle); answers sit at the end, so most needles lie far beyond an attention window. By default
(``cut="sentence"``, as RULER) the needle goes between haystack sentences, so in a short example
whose haystack is one or two noise paragraphs it sits at token 0 or after the first paragraph
whatever the depth; ``cut="token"`` cuts the haystack at the token the depth names, so needle
positions spread over the range (a sentence may be split around the needle).
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

Encode = Callable[[str], list[int]]
SUITES = ("passkey", "number", "uuid", "mqar")
CUTS = ("sentence", "token")  # where a needle may go in the haystack (module doc)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_SUBJECTS = (
    "the founders", "most startups", "a good essay", "the best programmers", "investors",
    "a small team", "the city", "every writer", "young researchers", "the old library",
    "a careful reader", "large companies", "the first users", "most people", "good teachers",
)  # fmt: skip
_ADVERBS = ("often", "rarely", "eventually", "quietly", "usually", "never really", "slowly")
_VERBS = (
    "build", "notice", "ignore", "explain", "discover", "change", "measure", "question",
    "underestimate", "remember", "forget", "improve", "choose", "describe",
)  # fmt: skip
_OBJECTS = (
    "what users actually want", "the shape of the problem", "a simpler idea", "the hardest part",
    "their own assumptions", "the cost of waiting", "how much time growth takes", "the details",
    "the reasons behind a rule", "a better question", "the work that matters", "small wins",
)  # fmt: skip
_TAILS = (
    "", " in the long run", " when nobody is watching", " because it is easier", " at first",
    " without meaning to", " as the years go by", " more than they admit",
)  # fmt: skip
_WORDS = (
    "apple", "river", "candle", "meadow", "falcon", "harbor", "lantern", "pepper", "quartz",
    "saddle", "thistle", "violet", "walnut", "anchor", "button", "cobalt", "ember", "glacier",
    "hazel", "island", "juniper", "kettle", "marble", "nectar", "orchid", "pillow", "raven",
    "silver", "timber", "velvet", "willow", "zephyr",
)  # fmt: skip


@dataclass
class Example:
    """``tokens`` has exactly the requested length; ``answers`` are [start, end) token spans
    the model must predict (the logits at start-1 .. end-2), with their text in ``needles``."""

    suite: str
    tokens: list[int]
    answers: list[tuple[int, int]]
    needles: list[tuple[str, str]]  # (key, value) as inserted; value == decoded answer
    depth: float  # where the (first) needle sits, as a fraction of the example
    meta: dict = field(default_factory=dict)


def example_rng(suite: str, length: int, seed: int, index: int) -> random.Random:
    """A string seed goes through sha512 in Python: the same numbers on every run and machine."""
    return random.Random(f"titans-synthetic:{suite}:{length}:{seed}:{index}")


def essay_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_ADVERBS)} {rng.choice(_VERBS)} "
    s += f"{rng.choice(_OBJECTS)}{rng.choice(_TAILS)}. "
    return s[0].upper() + s[1:]


def _haystack(
    rng: random.Random, style: str, n_tokens: int, encode: Encode, phase: bool = False
) -> list[list[int]]:
    """Sentences (token lists) totalling exactly n_tokens; the last one is cut to fit. ``phase``:
    the noise paragraph starts at a random character, so a short haystack is not always its
    beginning (a training-data option: docs/results.md, "Beyond the training length")."""
    out, total, cache = [], 0, {}
    start = rng.randrange(len(NOISE)) if phase and style == "noise" else 0
    while total < n_tokens:
        text = NOISE if style == "noise" else essay_sentence(rng)
        text, start = text[start:], 0
        ids = cache.setdefault(text, encode(text))
        out.append(ids[: n_tokens - total])
        total += len(out[-1])
    return out


def _cut(hay: list[list[int]], frac: float, cut: str) -> tuple[list[list[int]], int]:
    """The haystack's pieces and how many go before the needle: a share ``frac`` of the
    sentences (``sentence``), or of the tokens, splitting the haystack there (``token``)."""
    if cut == "sentence":
        return hay, round(frac * len(hay))
    flat = [t for piece in hay for t in piece]
    at = round(frac * len(flat))
    return [flat[:at], flat[at:]], 1


def _assemble(
    pieces: list[tuple[str | list[int], bool]], encode: Encode
) -> tuple[list[int], list[tuple[int, int]]]:
    tokens: list[int] = []
    answers = []
    for piece, is_answer in pieces:
        ids = encode(piece) if isinstance(piece, str) else piece
        if is_answer:
            answers.append((len(tokens), len(tokens) + len(ids)))
        tokens += ids
    return tokens, answers


def _single_needle(
    suite: str,
    rng: random.Random,
    length: int,
    encode: Encode,
    depth: tuple[float, float],
    phase: bool = False,
    cut: str = "sentence",
) -> Example:
    if suite == "passkey":
        key, value = "pass key", str(rng.randrange(10_000, 100_000))
        needle = f"The pass key is {value}. Remember it. {value} is the pass key. "
        query, style = "\nWhat is the pass key? The pass key is", "noise"
    else:
        key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        if suite == "number":
            value, what = str(rng.randrange(1_000_000, 10_000_000)), "number"
        else:
            key, what = rng.choice(_WORDS), "uuid"
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        needle = f"The special magic {what} for {key} is: {value}. "
        query, style = f"\nThe special magic {what} for {key} is:", "essay"
    fixed = len(encode(needle)) + len(encode(query)) + len(encode(" " + value))
    room = length - fixed
    if room < 0:
        raise ValueError(f"{suite}: length {length} is too short for the needle and the query")
    hay = _haystack(rng, style, room, encode, phase)
    hay, at = _cut(hay, rng.uniform(*depth), cut)
    pieces = [(s, False) for s in hay[:at]] + [(needle, False)]
    pieces += [(s, False) for s in hay[at:]] + [(query, False), (" " + value, True)]
    tokens, answers = _assemble(pieces, encode)
    needle_at = sum(len(s) for s in hay[:at])
    return Example(suite, tokens, answers, [(key, value)], needle_at / length)


def _mqar(
    rng: random.Random,
    length: int,
    encode: Encode,
    pairs: int,
    depth: tuple[float, float],
    cut: str = "sentence",
) -> Example:
    letters = string.ascii_lowercase
    keys = rng.sample([a + b for a in letters for b in letters], pairs)
    values = [f"{rng.randrange(100):02d}" for _ in keys]
    facts: list[tuple[str | list[int], bool]] = [(f"{k}:{v} ", False) for k, v in zip(keys, values)]
    order = rng.sample(range(pairs), pairs)
    queries: list[tuple[str | list[int], bool]] = []
    for i in order:
        queries += [(f" {keys[i]}:", False), (values[i], True)]
    used = sum(len(encode(p)) for p, _ in facts + queries) + len(encode("\n"))
    room = length - used
    if room < 0:
        raise ValueError(f"mqar: length {length} is too short for {pairs} pairs")
    # The facts sit after a filler share of the haystack set by depth; the rest goes between.
    hay = _haystack(rng, "noise", room, encode)
    hay, at = _cut(hay, rng.uniform(*depth), cut)
    pieces = [(s, False) for s in hay[:at]] + facts + [(s, False) for s in hay[at:]]
    pieces += [("\n", False)] + queries
    tokens, answers = _assemble(pieces, encode)
    needles = [(keys[i], values[i]) for i in order]
    return Example("mqar", tokens, answers, needles, sum(len(s) for s in hay[:at]) / length)


def generate(
    suite: str,
    length: int,
    count: int,
    encode: Encode,
    seed: int = 0,
    depth: tuple[float, float] = (0.0, 1.0),
    pairs: int = 8,
    phase: bool = False,
    cut: str = "sentence",
) -> list[Example]:
    """``count`` examples of ``length`` tokens; example i depends only on (suite, length, seed,
    i), so a larger count extends a smaller one. ``phase``: single-needle noise haystacks start
    at a random point of the noise paragraph (default: at its start, as RULER). ``cut``: where
    the needle may go, between sentences or at any token (module doc)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}: expected one of {', '.join(CUTS)}")
    if not 0.0 <= depth[0] <= depth[1] <= 1.0:
        raise ValueError(f"depth range {depth} must lie within [0, 1]")
    out = []
    for i in range(count):
        rng = example_rng(suite, length, seed, i)
        if suite == "mqar":
            ex = _mqar(rng, length, encode, pairs, depth, cut)
        else:
            ex = _single_needle(suite, rng, length, encode, depth, phase, cut)
        assert len(ex.tokens) == length, (suite, length, len(ex.tokens))
        out.append(ex)
    return out


def check_answers(example: Example, decode: Callable[[list[int]], str]) -> list[bool]:
    """Whether each answer span decodes to its needle's value (ignoring the leading space)."""
    return [
        decode(example.tokens[a:b]).strip() == value
        for (a, b), (_, value) in zip(example.answers, example.needles)
    ]
