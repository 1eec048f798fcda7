"""A tiny in-process recall trainer for tests: does a model *learn* to recall beyond its window?

The synthetic suites (``titans_train.synthetic``) are written for a real tokenizer; with bytes a
pass-key example needs ~110 tokens. ``word_encode`` makes each word of the suites' fixed texts
one token, and every other character (digits, letters of MQAR keys, punctuation) one token, so a
pass-key example fits in 64 tokens (needle 23, question 11, answer 5 digits) with a vocabulary
of ``WORD_VOCAB_SIZE``. Training is a plain AdamW loop with the loss on the answers only, in one
process, on one thread (when a tiny model discovers recall depends on the thread count).
"""

from __future__ import annotations

import re
import string
import time
from dataclasses import dataclass

import torch

from titans_train.models import LMState, ModelConfig, TitansLM
from titans_train.recall import score
from titans_train.synthetic import NOISE, Example, generate

# The words of the pass-key haystack, needle and question; everything else is spelled out.
_WORDS = sorted(set(re.findall(r"[A-Za-z]{2,}", NOISE + " The pass key is Remember it What the")))
_CHARS = list(string.digits + string.ascii_lowercase + string.ascii_uppercase + ".,:?!-\n")
WORD_VOCAB = _WORDS + [c for c in _CHARS if c not in _WORDS]
WORD_VOCAB_SIZE = len(WORD_VOCAB)
_IDS = {t: i for i, t in enumerate(WORD_VOCAB)}
_SPLIT = re.compile(r"[A-Za-z]+|\S|\n")


# The recall guards' and probes' setup: examples of L word tokens; held out with the needle in the
# first fifth of the haystack (at L it opens the haystack); the tiny model they start from.
RECALL_L, FAR = 64, (0.0, 0.2)
TINY = dict(vocab_size=WORD_VOCAB_SIZE, dim=32, depth=2, heads=2, num_persistent=4)


def word_encode(text: str) -> list[int]:
    """Known words -> one token each; any other word letter by letter; spaces dropped."""
    out: list[int] = []
    for piece in _SPLIT.findall(text):
        if piece in _IDS:
            out.append(_IDS[piece])
        else:
            try:
                out += [_IDS[c] for c in piece]
            except KeyError as e:
                raise ValueError(f"word_encode: character {e.args[0]!r} has no token") from None
    return out


@dataclass
class RecallRun:
    model: TitansLM
    losses: list[float]  # answer loss per step
    cpu_seconds: float


def examples(
    suite: str, length: int, count: int, seed: int, depth: tuple[float, float], pairs: int = 4
) -> list[Example]:
    return generate(suite, length, count, word_encode, seed=seed, depth=depth, pairs=pairs)


def batch_tensors(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, T-1]; targets are -100 except at the answer tokens."""
    tokens = torch.tensor([e.tokens for e in batch], dtype=torch.long)
    targets = torch.full_like(tokens, -100)
    for row, e in enumerate(batch):
        for a, b in e.answers:
            targets[row, a:b] = tokens[row, a:b]
    return tokens[:, :-1], targets[:, 1:]


def train_recall(
    cfg: ModelConfig,
    suite: str,
    length: int,
    steps: int,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    depth: tuple[float, float] = (0.0, 1.0),
    warmup: int = 20,
    pairs: int = 4,
    carry: int = 0,
    carry_from: int = 0,
    haystack: int = 0,
    far: float = 0.0,
) -> RecallRun:
    """Train a fresh ``TitansLM(cfg)`` (init seed ``seed``) for ``steps`` AdamW steps on
    ``suite`` examples of ``length`` tokens (data seed 1000 + seed), loss on the answers only.

    ``carry`` = K > 0: truncated BPTT. Each batch row is a stream (row r sees examples r, B + r,
    2B + r, ...: the same data in the same order as K = 0); the state step s returns is detached
    and passed to step s + 1, and dropped every K steps, so the examples meet memories that have
    absorbed 0 to (K - 1) examples; the gradient still spans one example. The *whole* state is
    carried (memory, attention window tail, positions, conv tails): the stream is the examples
    concatenated, fed one at a time, which is how ``titans-eval`` feeds one long example, so
    chunk and segment boundaries and RoPE positions are the stream's, and the first tokens of an
    example see the last ones of the previous through the window (a few tokens; the examples
    are independent texts, as packed rows without document masking). Resetting all rows at the
    same step keeps one ``pos`` per state (per-row resets would need ``doc_starts``); the
    learned initial memory M0 then gets its gradient only on the fresh steps, 1 in K.
    ``carry_from``: the steps before it run without carry (a curriculum: learn the task on fresh
    memories first).

    ``haystack`` = H > 0 (instead of carry; from ``carry_from`` on): each step starts from a state
    that has absorbed n ~ U{0..H} pieces of ``length - 1`` haystack tokens (``haystack_state``, no
    gradient): a used memory without the previous examples' needles in it. ``far`` (needs
    ``haystack``): in a step with n >= 1 pieces, that share of the rows is a pass-key example
    whose needle lies in those pieces (``far_rows``), as the study's ``--far-needles``: its loss
    trains reading a needle back over more than ``length`` tokens, and the gates not to let the
    tokens between overwrite it, while the gradient still spans ``length`` tokens."""
    if carry and haystack:
        raise ValueError("train_recall: carry and haystack are exclusive")
    if far and (not haystack or suite != "passkey" or not 0.0 < far <= 1.0):
        raise ValueError(f"train_recall: far={far} needs haystack > 0, passkey and 0 < far <= 1")
    gen = torch.Generator().manual_seed(10_000 + seed)  # the haystack draws; not the model's
    torch.manual_seed(seed)
    model = TitansLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    data = examples(suite, length, steps * batch, 1000 + seed, depth, pairs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses, t0, state = [], time.process_time(), None
    try:
        for step in range(steps):
            x, y = batch_tensors(data[step * batch : (step + 1) * batch])
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            if not carry or step < carry_from or (step - carry_from) % carry == 0:
                state = None
            if haystack and step >= carry_from:
                hay = haystack_tokens(gen, batch, length - 1, haystack)
                if far and hay.shape[1]:
                    k, data_seed = max(1, round(far * batch)), 1_000_000 * (seed + 1) + step
                    prefix, x[:k], y[:k] = far_rows(hay.shape[1], length, k, data_seed)
                    hay[:k] = prefix
                state = streamed_state(model, hay, length - 1)
            out = model(x, targets=y, state=state)
            loss = out.loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if carry:
                state = out.state.detach()
    finally:
        torch.set_num_threads(threads)
    return RecallRun(model.eval(), losses, time.process_time() - t0)


def haystack_state(
    model: TitansLM, gen: torch.Generator, rows: int, piece: int, most: int
) -> LMState | None:
    """The state after ``haystack_tokens``, fed one piece at a time; None if n = 0."""
    return streamed_state(model, haystack_tokens(gen, rows, piece, most), piece)


def haystack_tokens(gen: torch.Generator, rows: int, piece: int, most: int) -> torch.Tensor:
    """[rows, n * piece] tokens of the pass-key haystack (the noise paragraph repeated, at a
    random phase per row), n ~ U{0..most}."""
    n = int(torch.randint(0, most + 1, (1,), generator=gen))
    if n == 0:  # no phase draws then, as before the far rows existed (the same runs)
        return torch.zeros(rows, 0, dtype=torch.long)
    period = len(word_encode(NOISE))
    ids = torch.tensor(word_encode(NOISE * (n * piece // period + 2)))
    starts = torch.randint(0, period, (rows,), generator=gen).tolist()
    return torch.stack([ids[a : a + n * piece] for a in starts])


@torch.no_grad()
def streamed_state(model: TitansLM, tokens: torch.Tensor, piece: int) -> LMState | None:
    """The state after ``tokens`` [B, T], fed ``piece`` at a time, no gradient; None if T = 0."""
    state = None
    for i in range(0, tokens.shape[1], piece):
        state = model(tokens[:, i : i + piece], state=state).state
    return state


def far_rows(
    burn_in: int, length: int, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` pass-key examples of burn_in + length tokens with the needle starting in the
    first ``burn_in`` (cut at a token; ``benchmarks/study_data.far_needles``), split into the
    burn-in [count, burn_in] and the trained part's (inputs, targets) [count, length - 1]."""
    total = burn_in + length
    exs = generate(
        "passkey", total, count, word_encode, seed=seed, depth=(0.0, burn_in / total), cut="token"
    )
    x, y = batch_tensors(exs)
    return x[:, :burn_in], x[:, burn_in:], y[:, burn_in:]


def recall_scores(
    model: TitansLM,
    suite: str,
    length: int,
    count: int = 64,
    seed: int = 7,
    depth: tuple[float, float] = (0.0, 1.0),
    pairs: int = 4,
    piece: int | None = None,
) -> tuple[float, float]:
    """(exact match, answer-token accuracy) on ``count`` held-out examples (data seed ``seed``),
    greedy, fed ``piece`` tokens at a time with the state carried (default: the whole example;
    ``recall.score``)."""
    held_out = examples(suite, length, count, seed, depth, pairs)
    exact, share = score(model, held_out, piece=piece or length)
    return sum(exact) / len(exact), sum(share) / len(share)


def tiny_mac_input() -> ModelConfig:
    """MAC writing its block input (docs/results.md: the write that does not depend on its own
    read); segments of 16 tokens, so the needle is 2+ segments before the question."""
    return ModelConfig(
        **TINY, variant="mac", mac_write="input", segment_len=16, chunk_size=16, window=8
    )


def tiny_mag() -> ModelConfig:
    """MAG with window 8 and 8-token chunks, memory_max_lr 0.5 (default 0.1). Trained on needles
    at the start only, with 0.1, seed 1 stayed at chance for 600 steps of 8 and 400 of 16. After
    400 steps of 16, seed 1, exact % (digits %) at L / 2L: 0.5 alone 28 (77) / 3 (45); needles
    at every depth alone 36 (81) / 13 (69); both (the test's setup) 95 (99) / 84 (97). Seed 0
    with 0.1 and every depth passes: 83 (97) / 88 (97) / 28 (76) at 4L."""
    return ModelConfig(**TINY, variant="mag", window=8, chunk_size=8, memory_max_lr=0.5)


def tiny_mal() -> ModelConfig:
    """MAL with ``tiny_mag``'s window, chunks and memory_max_lr (the two-phase guard's MAL)."""
    return ModelConfig(**TINY, variant="mal", window=8, chunk_size=8, memory_max_lr=0.5)
