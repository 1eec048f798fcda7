"""MQAR beyond exact match: true recall apart from the 1/P plateau (issue 15 item 3).

A model on the plateau knows which P values appeared but not which key each belongs to: it
puts its probability on the example's values and picks among them at chance (1/P). For every
query of an MQAR example (the study's: ``titans-eval``'s generator, seed 0, 4 pairs) this scores
each of the example's P values as the answer, with the other answers as written (teacher
forcing; the model streams in pieces of the training length with its state carried, as
``titans-eval`` does), and reports per length:

- ``exact``: greedy exact match (what ``titans-eval`` reports);
- ``value_mass``: the mean probability the model gives to the example's P values together
  (near 1: it knows which values appeared; for 2-digit values chance is P/100);
- ``key_choice``: how often the right value scores highest among the P (chance 1/P);
- ``plateau``: the mean of 1/P over the answers (P: the example's distinct values), for
  reference: ``key_choice`` at this level with ``value_mass`` near 1 is the plateau.
- ``key_choice_first``: ``key_choice`` on each example's first query only. MQAR asks every key
  once, so a model that knows which values appeared and which it has already answered can pick
  the i-th answer among the P - i values still unasked: a shortcut that needs no binding. The
  first query is the one it cannot help; chance there is 1/P.
- ``elimination``: the mean over the answers of 1 / (distinct values not yet answered), the
  ``key_choice`` that shortcut reaches at chance (4 pairs: (1/4 + 1/3 + 1/2 + 1) / 4 = 52 %).
  ``key_choice`` near it with ``key_choice_first`` near 1/P is the shortcut, not recall.
- ``first_token`` and ``later_tokens``: greedy accuracy on an answer's first token (after the
  query's ``:``, where the key must be bound) and on its other tokens given the right ones
  before them (a plain copy of the value's next digit, an induction head's job).

    python benchmarks/study_mqar.py RUN_DIR [RUN_DIR ...] --lengths 128,256,512 --depth 0,0.5
    python benchmarks/study_mqar.py --smoke --out F.json   # an untrained tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titans_train.load import open_checkpoint  # noqa: E402
from titans_train.models import ModelConfig, TitansLM  # noqa: E402
from titans_train.perplexity import stream_logits  # noqa: E402
from titans_train.synthetic import Example, generate  # noqa: E402


def candidates(ex: Example) -> list[list[int]]:
    """The example's distinct values as token lists (each can stand in any answer span);
    values of unequal token length cannot be swapped, so such examples are refused."""
    spans = []
    for a, b in ex.answers:
        if ex.tokens[a:b] not in spans:
            spans.append(ex.tokens[a:b])
    if len({len(s) for s in spans}) != 1:
        raise ValueError("MQAR values of unequal token length: cannot swap them")
    return spans


@torch.no_grad()
def score_example(model, ex: Example, piece: int) -> dict:
    """exact, value_mass and key_choice of each of the example's answers (module doc)."""
    values = candidates(ex)
    rows = []
    for a, b in ex.answers:  # one row per (answer, candidate value): that value put in place
        for v in values:
            t = list(ex.tokens)
            t[a:b] = v
            rows.append(t)
    tokens = torch.tensor(rows, dtype=torch.long)
    pieces = stream_logits(model, tokens, piece)
    logp = torch.cat([lg.float().log_softmax(-1) for _, lg in pieces], 1)
    out = []
    P = len(values)
    for i, (a, b) in enumerate(ex.answers):
        lp = []
        for j in range(P):
            r = i * P + j
            lp.append(sum(float(logp[r, k - 1, tokens[r, k]]) for k in range(a, b)))
        right = values.index(ex.tokens[a:b])
        own = i * P + right  # the row with the true value: greedy exact match on it
        hits = [int(logp[own, k - 1].argmax()) == ex.tokens[k] for k in range(a, b)]
        exact = all(hits)
        mass = float(torch.tensor(lp).exp().sum())
        best = max(range(P), key=lambda j: lp[j])
        unasked = {tuple(ex.tokens[c:d]) for c, d in ex.answers[i:]}
        out.append(
            dict(exact=exact, value_mass=mass, key_choice=best == right, choices=P, query=i,
                 unasked=len(unasked), first_token=hits[0],
                 later_tokens=sum(hits[1:]) / (len(hits) - 1) if len(hits) > 1 else None)
        )  # fmt: skip
    return out


def summarize(answers: list[dict]) -> dict:
    """Means over one length's answers (module doc): exact, value_mass, key_choice, plateau,
    key_choice_first, elimination, the answer count, and first_token and later_tokens when the
    answers carry them."""
    n = len(answers)
    first = [a for a in answers if a["query"] == 0]
    res = {k: sum(float(a[k]) for a in answers) / n for k in ("exact", "value_mass", "key_choice")}
    res.update(
        answers=n,
        plateau=sum(1 / a["choices"] for a in answers) / n,
        key_choice_first=sum(float(a["key_choice"]) for a in first) / len(first),
        elimination=sum(1 / a["unasked"] for a in answers) / n,
    )
    if all("first_token" in a for a in answers):
        later = [a["later_tokens"] for a in answers if a["later_tokens"] is not None]
        res["first_token"] = sum(float(a["first_token"]) for a in answers) / n
        res["later_tokens"] = sum(later) / len(later) if later else None
    return res


def probe_model(model, enc, piece: int, lengths, count: int, depth, pairs: int) -> dict:
    """{length: summarize(its answers)} of one model (module doc)."""
    res = {}
    for length in lengths:
        answers = []
        for ex in generate("mqar", length, count, enc, seed=0, depth=depth, pairs=pairs):
            answers += score_example(model, ex, piece)
        res[length] = summarize(answers)
    return res


def probe(
    spec: str, lengths: list[int], count: int, depth: tuple[float, float], pairs: int
) -> dict:
    ckpt = open_checkpoint(spec)
    tok = ckpt.tokenizer()
    enc = lambda s: tok.encode_batch([s])[0].tolist()  # noqa: E731
    piece = int(ckpt.config.get("train", {}).get("seq_len") or 512)
    res = probe_model(ckpt.model().eval(), enc, piece, lengths, count, depth, pairs)
    return {"checkpoint": str(ckpt.path), "variant": ckpt.model_config.variant, "results": res}


def smoke() -> list[dict]:
    """--smoke: an untrained tiny MAG (no checkpoint), 2 examples of 64 tokens, 2 pairs."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant="mag", vocab_size=320, dim=32, depth=1, heads=2, window=16,
                      segment_len=16, chunk_size=8)  # fmt: skip
    enc = lambda s: list(s.encode())  # noqa: E731
    res = probe_model(TitansLM(cfg).eval(), enc, 64, [64], 2, (0.0, 0.5), 2)
    return [{"checkpoint": None, "variant": "mag", "results": res}]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="run or checkpoint directories")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--samples", type=int, default=32, help="examples per length")
    ap.add_argument("--depth", default="0,0.5", help="needle depth range (the study's far)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--smoke", action="store_true", help="an untrained tiny model, seconds")
    args = ap.parse_args(argv)
    if not args.runs and not args.smoke:
        ap.error("name at least one run directory (or --smoke)")
    depth = tuple(float(x) for x in args.depth.split(","))
    lengths = [int(x) for x in args.lengths.split(",")]
    out = (
        smoke()
        if args.smoke
        else [probe(r, lengths, args.samples, depth, args.pairs) for r in args.runs]
    )
    for r in out:
        for length, v in r["results"].items():
            print(
                f"{r['variant']} {length}: exact {100 * v['exact']:.0f} %, value mass "
                f"{v['value_mass']:.2f}, key choice {100 * v['key_choice']:.0f} % "
                f"(1/P {100 * v['plateau']:.0f} %, elimination {100 * v['elimination']:.0f} %), "
                f"first query {100 * v['key_choice_first']:.0f} %; tokens: first "
                f"{100 * v['first_token']:.0f} %, later {100 * (v['later_tokens'] or 0):.0f} %"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
