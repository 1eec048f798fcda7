"""Probe: does carrying the memory state across training samples help recall beyond L?

Trained at L, the models recall a pass key at L but collapse at 4L-8L, and the measurements
(docs/results.md, "Beyond the training length") point at the state at the needle: in training
the needle always lands in an almost fresh memory, at 8L in one that has absorbed hundreds of
tokens. Truncated BPTT shows the model used memories while the gradient still spans L: each
batch row is a stream, the state of step s is detached and passed to step s + 1, and reset every
K steps (``train_recall(carry=K)``, tests/test_probe_carry.py).

Per variant x arm (carry 0 / K) x seed: a tiny model trained in-process with
``titans_train.testing.recall_training`` (the word-level pass key of L = 64 tokens, loss on the
answers, each variant with the recipe of its test in tests/test_recall_learning.py; the same
steps, seed and data in both arms), then greedy exact match and the share of answer digits at
L, 2L, 4L, 8L on held-out examples with the needle in the first fifth, fed L tokens at a time
with the state carried (fresh per example), as ``titans-eval`` does. Also per run: the loss
curve, the loss per memory age (carry), and the memory gates at 4L (``gate_stats``).

Other arms: ``--carry-from N`` (a curriculum: no carry before step N), ``--haystack H`` (each
step from a state that absorbed 0..H pieces of haystack, no earlier needles in it) and ``--far
F`` (with it: a share F of the rows asks for a needle inside those pieces; study v5's second
phase, tiny, as tests/test_recall_learning.py's two-phase guard).

    OMP_NUM_THREADS=1 python benchmarks/probe_carry.py --variants mag,mac-input,mal \
        --carry 0,8 --seeds 0,1 --out runs/carry/main.json
    python benchmarks/probe_carry.py --variants mac-input --carry 8,0 --carry-from 200 \
        --haystack 7 --steps 400 --seeds 0 --out runs/carry/mac_curriculum.json
    python benchmarks/probe_carry.py --variants mag,mal-0.5 --carry 0 --carry-from 400 \
        --haystack 3 --far 0.5 --steps 600 --seeds 0,1,2,3 --out runs/carry/two_phases.json
    python benchmarks/probe_carry.py --smoke --out smoke.json     # 2 steps, seconds (CI)

Findings: docs/results.md, "Carrying the memory across training samples (truncated BPTT)".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from titans_train.models import ModelConfig, TitansLM
from titans_train.perplexity import stream_logits
from titans_train.testing.recall_training import (
    FAR,
    RECALL_L,
    TINY,
    examples,
    recall_scores,
    tiny_mac_input,
    tiny_mag,
    tiny_mal,
    train_recall,
)

L = RECALL_L


@dataclass(frozen=True)
class Recipe:
    """A variant's model and the training its recall test uses (tests/test_recall_learning.py)."""

    cfg: ModelConfig
    steps: int
    lr: float
    depth: tuple[float, float]  # needle depth of the training examples


def recipes() -> dict[str, Recipe]:
    every = (0.0, 1.0)  # MAG's test trains on needles at any depth (it learns faster)
    mag, mac = tiny_mag(), tiny_mac_input()
    # MAL has no test of its own: MAG's recipe with the default memory_max_lr 0.1 (seed 0 learns
    # it at L: 98 % exact; with 0.5, 94 %; docs/results.md)
    mal = ModelConfig(**TINY, variant="mal", window=8, chunk_size=8)
    control = ModelConfig(**TINY, variant="transformer", window=8)
    return {
        "mag": Recipe(mag, 400, 3e-3, every),
        "mac-input": Recipe(mac, 200, 1e-2, FAR),
        "mal": Recipe(mal, 400, 3e-3, every),
        "mal-0.5": Recipe(tiny_mal(), 400, 3e-3, every),  # memory_max_lr 0.5: the guard's MAL
        "transformer": Recipe(control, 400, 3e-3, every),
    }


def one_run(
    name: str, recipe: Recipe, arm: tuple[int, int, int, float], seed: int, mults: list[int],
    count: int, steps: int,
) -> dict:  # fmt: skip
    """Train one arm (carry K, from step N, haystack H, far share F) and score it; the JSON
    report's row."""
    carry, carry_from, haystack, far = arm
    run = train_recall(
        recipe.cfg, "passkey", L, steps=steps, batch=16, lr=recipe.lr, seed=seed,
        depth=recipe.depth, carry=carry, carry_from=carry_from, haystack=haystack, far=far,
    )  # fmt: skip
    t0 = time.process_time()
    scores = {}
    for n in mults:
        exact, digits = recall_scores(run.model, "passkey", n * L, count=count, depth=FAR, piece=L)
        scores[str(n * L)] = {"exact": round(100 * exact, 1), "digits": round(100 * digits, 1)}
    tail = run.losses[-50:]
    return dict(
        variant=name, carry=carry, carry_from=carry_from if carry or haystack else 0,
        haystack=haystack, far=far, seed=seed, steps=steps,
        lr=recipe.lr, depth=list(recipe.depth),
        train_cpu_s=round(run.cpu_seconds, 1), eval_cpu_s=round(time.process_time() - t0, 1),
        loss_last50=round(sum(tail) / len(tail), 3), scores=scores,
        loss_curve=[round(sum(c) / len(c), 3) for c in chunks(run.losses, 50)],
        loss_by_age=by_age(run.losses, carry),
        gates_4L=gate_stats(run.model, 4 * L, count=min(count, 8)),
    )  # fmt: skip


@torch.no_grad()
def gate_stats(model: TitansLM, length: int, count: int = 8) -> dict[str, dict]:
    """Per memory block, on ``count`` held-out pass-key examples of ``length`` tokens fed L at a
    time: the mean forgetting alpha and write rate theta per token (heads and tokens), and the
    share of a write kept after 100 tokens at that forgetting, exp(100 * mean log(1 - alpha)).
    A stream of independent examples may teach the memory to forget the previous needles."""
    logs: dict[int, list[tuple]] = {}
    for i, block in enumerate(model.blocks):
        memory = getattr(block, "memory", None)
        if memory is None:
            continue

        logs[i] = []

        def record(x, _g=memory._gates, _log=logs[i]):
            out = _g(x)
            _log.append((out[0].mean().item(), out[2].mean().item(), out[0].numel()))
            return out

        memory._gates = record  # an instance attribute over the method: removed below
    try:
        held = examples("passkey", length, count, 7, FAR)
        for _ in stream_logits(model, torch.tensor([e.tokens for e in held]), L):
            pass
    finally:
        for i in logs:
            del model.blocks[i].memory._gates
    stats = {}
    for i, rec in logs.items():
        n = sum(r[2] for r in rec)
        theta, log_keep = (sum(r[k] * r[2] for r in rec) / n for k in (0, 1))
        alpha = 1 - torch.tensor(log_keep).exp().item()  # of the mean log keep
        keep100 = torch.tensor(100 * log_keep).exp().item()
        stats[str(i)] = {
            "theta": round(theta, 4),
            "alpha": round(alpha, 5),
            "keep100": round(keep100, 3),
        }
    return stats


def chunks(xs: list[float], n: int) -> list[list[float]]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def by_age(losses: list[float], carry: int) -> dict[str, float]:
    """Mean answer loss over the last quarter of training per memory age (examples the carried
    state had absorbed: step % K): does a used memory cost recall where a fresh one does not?"""
    if not carry:
        return {}
    start = len(losses) - max(carry, len(losses) // 4)
    ages: dict[str, list[float]] = {}
    for step in range(start, len(losses)):
        ages.setdefault(str(step % carry), []).append(losses[step])
    return {
        k: round(sum(v) / len(v), 3) for k, v in sorted(ages.items(), key=lambda kv: int(kv[0]))
    }


def arm_name(row: dict) -> str:
    carry, start, hay = row["carry"], row.get("carry_from", 0), row.get("haystack", 0)
    name = f"haystack {hay}" if hay else str(carry)
    name += f", far {row['far']}" if row.get("far") else ""
    return f"{name} from step {start}" if start and (carry or hay) else name


def table(rows: list[dict]) -> str:
    """Markdown: exact % (digits %) per length, one line per run."""
    lengths = list(rows[0]["scores"]) if rows else []
    head = "| variant | carry | seed | " + " | ".join(lengths) + " | loss | train CPU s |"
    lines = [head, "|" + "---|" * (len(lengths) + 5)]
    for r in rows:
        cells = [f"{s['exact']:.0f} ({s['digits']:.0f})" for s in r["scores"].values()]
        lines.append(
            f"| {r['variant']} | {arm_name(r)} | {r['seed']} | " + " | ".join(cells)
            + f" | {r['loss_last50']:.2f} | {r['train_cpu_s']:.0f} |"
        )  # fmt: skip
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="mag,mac-input,mal", help=",".join(recipes()))
    ap.add_argument("--carry", default="0,8", help="arms: K = 0 (no carry) or steps per stream")
    ap.add_argument("--carry-from", type=int, default=0, help="carry arms: no carry before it")
    ap.add_argument("--haystack", type=int, default=0, help="an arm: H haystack pieces (no carry)")
    ap.add_argument("--far", type=float, default=0.0, help="the haystack arm: far-needle share")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--mults", default="1,2,4,8", help="evaluation lengths, in units of L")
    ap.add_argument("--count", type=int, default=64, help="held-out examples per length")
    ap.add_argument("--steps", type=int, help="override every recipe's steps")
    ap.add_argument("--out", help="write the JSON here (rewritten after every run)")
    ap.add_argument("--smoke", action="store_true", help="2 steps, 4 examples, L and 2L (CI)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.smoke:
        args.variants, args.carry, args.seeds = "mag,mac-input", "0,2", "0"
        args.mults, args.count, args.steps = "1,2", 4, 2
    book = recipes()
    unknown = set(args.variants.split(",")) - set(book)
    if unknown:
        raise SystemExit(f"probe_carry: unknown variant(s) {sorted(unknown)}; known: {list(book)}")
    if args.far and not args.haystack:
        raise SystemExit(f"probe_carry: --far {args.far} needs --haystack H > 0")
    mults = [int(x) for x in args.mults.split(",")]
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.variants.split(","):
            arms = [(int(k), args.carry_from, 0, 0.0) for k in args.carry.split(",") if k]
            arms += [(0, args.carry_from, args.haystack, args.far)] if args.haystack else []
            for arm in arms:
                recipe = book[name]
                steps = args.steps or recipe.steps
                rows.append(one_run(name, recipe, arm, seed, mults, args.count, steps))
                print(json.dumps(rows[-1]), flush=True)
                if args.out:  # after every run: a long sweep keeps what it measured
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
