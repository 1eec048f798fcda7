"""Does the full-attention control learn MQAR when keys and values are single tokens?

A plain training loop (one process, no DeepSpeed) of the study's full-attention Transformer++
(benchmarks/study.py: MODEL with ``window=None``, SwiGLU 352) on MQAR alone, 4 pairs, L = 128,
the loss on the answers only, fresh examples every step, in one of three formats:

- ``study``: synthetic.py's MQAR (``ab:12 cd:34 ...`` then `` cd:34 ab:12``): two-letter keys,
  two-digit values, a ``:`` between; the first answer token is predicted at the ``:``, so the
  key sits one and two tokens back.
- ``colon``: one-letter keys and one-digit values with the ``:`` (``a:1 c:3 ...``): the key
  one token back from where its value is predicted.
- ``single``: one-letter keys, one-digit values, no ``:`` (``a1 c3 ...``, queries `` c3``): the
  value is predicted at the key itself, Zoology's layout (a previous-token head plus an
  induction head solve it).

Filler: the noise paragraph, as synthetic.py, between the facts and the queries.

``--conv K``: a causal depthwise convolution of width K added to the token embeddings
(x + conv(x)), the short token mixing the Titans memory has on its q, k, v (``conv_kernel``)
and Zoology's attention baselines can have: it puts the previous tokens at each position,
which full attention otherwise has to build with a previous-token head.

    python benchmarks/probe_mqar_format.py --format single --steps 1200 --out F.json
    python benchmarks/probe_mqar_format.py --smoke --out F.json   # 2 steps of 2 examples (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titans_train.models import ModelConfig, TitansLM  # noqa: E402
from titans_train.synthetic import NOISE, generate  # noqa: E402

MODEL = dict(
    vocab_size=320, dim=64, depth=2, heads=4, window=None, segment_len=16, chunk_size=16,
    num_persistent=4, memory_depth=2, variant="transformer", ffn_hidden=352,
)  # fmt: skip


def example(fmt: str, rng: random.Random, length: int, pairs: int) -> tuple[list[int], list[int]]:
    """(tokens, indices of the answer tokens) of one example of ``length`` bytes."""
    if fmt == "study":
        ex = generate("mqar", length, 1, lambda s: list(s.encode()), seed=rng.randrange(1 << 30),
                      depth=(0.0, 0.3), pairs=pairs)[0]  # fmt: skip
        return ex.tokens, [k for a, b in ex.answers for k in range(a, b)]
    keys = rng.sample(string.ascii_lowercase, pairs)
    vals = [rng.choice(string.digits) for _ in keys]
    sep = ":" if fmt == "colon" else ""
    facts = "".join(f"{k}{sep}{v} " for k, v in zip(keys, vals))
    order = rng.sample(range(pairs), pairs)
    queries = "".join(f" {keys[i]}{sep}{vals[i]}" for i in order)
    room = length - len(facts) - len(queries) - 1
    text = facts + (NOISE * 4)[:room] + "\n" + queries
    start = len(facts) + room + 1
    answers = [start + j * (3 + len(sep)) + 2 + len(sep) for j in range(pairs)]
    tokens = list(text.encode())
    assert len(tokens) == length and all(chr(tokens[a]) in string.digits for a in answers)
    return tokens, answers


class ShortConv(torch.nn.Module):
    """x + a causal depthwise convolution of width k over time, zero-initialised."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.conv = torch.nn.Conv1d(dim, dim, k, groups=dim, padding=k - 1)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


def batch(fmt: str, rng: random.Random, n: int, length: int, pairs: int):
    toks, targets = [], []
    for _ in range(n):
        t, ans = example(fmt, rng, length, pairs)
        tgt = [-100] * length
        for a in ans:
            tgt[a] = t[a]
        toks.append(t)
        targets.append(tgt[1:])
    t = torch.tensor(toks)
    return t[:, :-1], torch.tensor(targets)


@torch.no_grad()
def accuracy(model, fmt: str, length: int, pairs: int, n: int = 256) -> dict:
    """Greedy accuracy on the answer tokens and exact match per query (all its tokens)."""
    rng = random.Random(12345)
    x, y = batch(fmt, rng, n, length, pairs)
    pred = model(x).logits.argmax(-1)
    hit = (pred == y) | (y == -100)
    tok = float(((pred == y) & (y != -100)).sum() / (y != -100).sum())
    per_query = (y != -100).sum(1)[0] // pairs  # answer tokens per query
    cols = [torch.nonzero(y[i] != -100).flatten() for i in range(n)]
    exact = [bool(hit[i, c[j * per_query:(j + 1) * per_query]].all())
             for i, c in enumerate(cols) for j in range(pairs)]  # fmt: skip
    return {"exact": sum(exact) / len(exact), "tokens": tok}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", choices=("study", "colon", "single"), default="study")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conv", type=int, default=0, help="a short conv of this width (module doc)")
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="2 steps of 2 examples, with the conv")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.conv = 2, 2, args.conv or 4
    torch.manual_seed(args.seed)
    model = TitansLM(ModelConfig(**MODEL))
    if args.conv:
        model.short_conv = ShortConv(MODEL["dim"], args.conv)
        model.embed.register_forward_hook(lambda mod, inp, out: model.short_conv(out))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(args.seed)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        warm = min(1.0, step / 50)
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * cos
        x, y = batch(args.format, rng, args.batch, args.length, args.pairs)
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            acc = accuracy(model, args.format, args.length, args.pairs)
            model.train()
            curve.append({"step": step, "loss": float(loss.detach()), **acc})
            print(
                f"step {step} loss {curve[-1]['loss']:.3f} exact {100 * acc['exact']:.0f} % "
                f"tokens {100 * acc['tokens']:.0f} % ({time.time() - t0:.0f} s)",
                flush=True,
            )
    res = {"args": vars(args), "curve": curve, "seconds": time.time() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
