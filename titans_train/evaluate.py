"""``titans-eval``: perplexity at several context lengths and long-context recall of a checkpoint.

    titans-eval --checkpoint runs/tiny-mac [--lengths 256,512,1024] [--suites ppl,sniah,mqar]
                [--data MANIFEST] [--json results.json] [--wandb]

``--checkpoint`` takes a ``step_XXXXXXXX`` directory, a run directory or its ``checkpoints/``
(newest complete checkpoint), ``latest`` with ``--run``, or a ``titans-export`` directory.
Suites: ``ppl`` (validation perplexity, perplexity.py), ``passkey``, ``number``, ``uuid``
(``sniah`` = all three) and ``mqar`` (synthetic.py, scored by recall.py). Prints one table
(a row per suite, a column per length), writes the same numbers as JSON and, with ``--wandb``,
into the training run's W&B summary (see docs/evaluation.md for why not its history).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from titans_train.checkpoint import CheckpointError
from titans_train.cli_common import add_source_args, tool_main, tool_parser
from titans_train.data.errors import DataError
from titans_train.load import (
    Checkpoint,
    add_placement_args,
    describe,
    dump_json,
    open_checkpoint,
    place,
)
from titans_train.models import TitansLM
from titans_train.perplexity import available_tokens, perplexity, stream_tokens
from titans_train.recall import recall_suite
from titans_train.synthetic import CUTS, SUITES

SNIAH = ("passkey", "number", "uuid")
# Scored tokens per length when --ppl-tokens is not given: enough that the 95 % interval of a
# small model's perplexity is a few percent wide (a few thousand tokens gave 22.5 against
# training's val/ppl 8.9 on the demo run; 100K gave 9.4).
DEFAULT_PPL_TOKENS = 100_000


def parse_suites(text: str) -> list[str]:
    out: list[str] = []
    for name in text.split(","):
        name = name.strip()
        expanded = SNIAH if name == "sniah" else (name,)
        for s in expanded:
            if s != "ppl" and s not in SUITES:
                # ArgumentTypeError: argparse shows this text (a ValueError it would replace).
                raise argparse.ArgumentTypeError(
                    f"unknown suite {s!r}: use ppl, sniah, {', '.join(SUITES)}"
                )
            if s not in out:
                out.append(s)
    return out


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_suites(
    checkpoint: Checkpoint, model: TitansLM, args: argparse.Namespace
) -> dict[str, dict[int, dict]]:
    results = {}
    trained = checkpoint.config.get("train", {}).get("seq_len")
    piece = args.piece or trained or 512
    torch.manual_seed(0)
    for suite in args.suites:
        t0 = time.perf_counter()
        if suite == "ppl":
            manifests = [args.data] if args.data else checkpoint.data_manifests()
            if not manifests:
                raise DataError(f"{checkpoint.path}: no data recorded; pass --data MANIFEST")
            results["ppl"] = run_perplexity(model, manifests[0], args, piece)
        else:
            tok = checkpoint.tokenizer()
            results[suite] = {}
            for n in args.lengths:  # one line per length: a long suite is not silent
                t1 = time.perf_counter()
                results[suite].update(
                    recall_suite(
                        model,
                        suite,
                        [n],
                        lambda s, tok=tok: tok.encode_batch([s])[0].tolist(),
                        args.samples,
                        piece,
                        seed=args.seed,
                        depth=args.depth,
                        pairs=args.pairs,
                        batch_size=args.batch,
                        cut=args.needle_cut,
                    )
                )
                r = results[suite][n]
                print(
                    f"{suite} @{n}: {100 * r['accuracy']:.1f} % exact over {r['answers']} "
                    f"answers ({time.perf_counter() - t1:.1f} s)",
                    file=sys.stderr,
                )
        print(f"{suite}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return results


def run_perplexity(model, manifest: str, args: argparse.Namespace, piece: int) -> dict:
    """Perplexity over ``--ppl-tokens`` tokens; by default DEFAULT_PPL_TOKENS, or as many as the
    split holds when that is fewer (said on stderr), so the number is comparable to training's
    val/ppl rather than a few windows' worth."""
    n_tokens = args.ppl_tokens or max(DEFAULT_PPL_TOKENS, 4 * max(args.lengths))
    if args.ppl_tokens is None:
        n_tokens = min(n_tokens, available_tokens(manifest) - 1)
    stream, marks, split = stream_tokens(manifest, n_tokens + 1, vocab_size=2**32)
    masking = args.document_masking == "on"
    results = perplexity(
        model, stream, args.lengths, n_tokens, piece, args.batch, marks if masking else None
    )
    for n, r in results.items():
        r["split"], r["document_masking"] = split, masking
        print(
            f"ppl @{n}: {r['ppl']:.3f} (95 % CI {r['ppl_low']:.3f}-{r['ppl_high']:.3f}) over "
            f"{r['tokens']} {split} tokens in {r['windows']} windows, document masking "
            f"{args.document_masking}",
            file=sys.stderr,
        )
    return results


def format_table(results: dict[str, dict[int, dict]], lengths: list[int]) -> str:
    """ppl rows show perplexity and its 95 % interval; recall rows exact-match accuracy in %
    with the share of answer tokens right in brackets (the legend under the table says so)."""
    head = ["length".ljust(16)] + [f"{n:>17}" for n in lengths]
    lines = ["".join(head)]
    for suite, per_len in results.items():
        cells = []
        for n in lengths:
            r = per_len.get(n)
            if r is None:
                cells.append(f"{'-':>17}")
            elif suite == "ppl":
                cells.append(f"{r['ppl']:>17.3f}")
            else:
                cells.append(f"{100 * r['accuracy']:>10.1f} ({100 * r['token_accuracy']:3.0f})")
        lines.append(("ppl" if suite == "ppl" else f"{suite} exact%").ljust(16) + "".join(cells))
        if suite == "ppl":
            ci = [f"{r['ppl_low']:.2f}-{r['ppl_high']:.2f}" for r in per_len.values()]
            lines.append("  95 % interval".ljust(16) + "".join(f"{c:>17}" for c in ci))
            tokens = [f"{r['tokens']}" for r in per_len.values()]
            lines.append("  scored tokens".ljust(16) + "".join(f"{c:>17}" for c in tokens))
    if any(suite != "ppl" for suite in results):
        lines.append("recall cells: exact-match accuracy % (answer tokens right %)")
    return "\n".join(lines)


def flat_metrics(results: dict[str, dict[int, dict]]) -> dict[str, float]:
    """eval/ppl@512, eval/passkey@512, eval/passkey_tokens@512, ... for W&B."""
    out = {}
    for suite, per_len in results.items():
        for n, r in per_len.items():
            if suite == "ppl":
                out[f"eval/ppl@{n}"] = r["ppl"]
            else:
                out[f"eval/{suite}@{n}"] = r["accuracy"]
                out[f"eval/{suite}_tokens@{n}"] = r["token_accuracy"]
    return out


def log_to_wandb(checkpoint: Checkpoint, results: dict) -> str:
    """Into the summary of the run that trained the checkpoint (history would collide with the
    trainer's steps: W&B drops rows below its current step, and rows beyond it would make a
    later resume of training lose its own)."""
    from titans_train.tracking import Tracker, TrackingConfig

    run_id = checkpoint.state.get("wandb_run_id")
    if not run_id:
        raise CheckpointError(
            f"{checkpoint.path}: --wandb needs a training checkpoint with a run id"
        )
    config = checkpoint.config
    run_dir = checkpoint.run_dir
    tracker = Tracker(
        TrackingConfig(**config.get("tracking", {})),
        run_dir=run_dir.path,
        run_name=config.get("name", run_dir.name),
        config=config,
        rank=0,
        run_id=run_id,
    )
    tracker.summary({**flat_metrics(results), "eval/checkpoint_step": checkpoint.step})
    tracker.finish()
    return f"W&B run {run_id} ({tracker.mode}) {tracker.run_path or ''}"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_source_args(ap, data_help="shard manifest for ppl (default: the run's val data)")
    ap.add_argument("--lengths", type=parse_ints, default="512,1024,2048,4096")
    ap.add_argument(
        "--suites",
        type=parse_suites,
        default="ppl,sniah,mqar",
        help=f"comma list of: ppl, sniah (= {', '.join(SNIAH)}), {', '.join(SUITES)}",
    )
    ap.add_argument("--samples", type=int, default=50, help="examples per recall suite/length")
    ap.add_argument(
        "--ppl-tokens",
        type=int,
        help=f"scored tokens per length (default: {DEFAULT_PPL_TOKENS} or 4 x the longest length, "
        "capped at what the split holds)",
    )
    ap.add_argument("--piece", type=int, help="tokens per forward (default: training seq_len)")
    ap.add_argument(
        "--document-masking",
        choices=["auto", "on", "off"],
        default="auto",
        help="ppl: restart the model at every document start of the packed stream (auto: as the "
        "checkpoint trained, data.document_masking; on for an exported model)",
    )
    ap.add_argument("--batch", type=int, default=4, help="sequences per forward")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic suites")
    ap.add_argument(
        "--depth",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=(0.0, 1.0),
        help="needle depth range as fractions, e.g. 0,0.5",
    )
    ap.add_argument(
        "--needle-cut",
        choices=CUTS,
        default="sentence",
        help="needles between haystack sentences (RULER; in short examples mostly at token 0) or "
        "at any token the depth names",
    )
    ap.add_argument("--pairs", type=int, default=8, help="MQAR key:value pairs")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--wandb", action="store_true", help="log into the checkpoint's W&B run")
    add_placement_args(ap)


DESCRIPTION = __doc__.split("\n\n")[0]


def parse_args(argv: list[str] | None, prog: str = "titans-eval") -> argparse.Namespace:
    return tool_parser(prog, DESCRIPTION, add_arguments).parse_args(argv)


def document_masking(choice: str, checkpoint: Checkpoint) -> str:
    """--document-masking resolved: ``auto`` follows the training config (a run saved before
    the key existed trained without masking); an exported model has none, so on."""
    if choice != "auto":
        return choice
    if checkpoint.exported or not checkpoint.config:
        return "on"
    return "on" if checkpoint.config.get("data", {}).get("document_masking", False) else "off"


def run_args(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.checkpoint, args.run, args.data)
    args.document_masking = document_masking(args.document_masking, checkpoint)
    model = place(checkpoint.model(), args.device, args.dtype)
    with torch.no_grad():
        results = run_suites(checkpoint, model, args)
    print(format_table(results, args.lengths))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "wandb")}
        provenance = describe(checkpoint, model)
        dump_json({"model": provenance, "settings": settings, "results": results}, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.wandb:
        print(log_to_wandb(checkpoint, results), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, prog: str = "titans-eval") -> int:
    return tool_main(prog, DESCRIPTION, add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
