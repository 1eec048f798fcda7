"""``titans-generate``: sample from a checkpoint or an exported model.

    titans-generate --checkpoint runs/tiny-mac --prompt "def main(" --max-new-tokens 200
    titans-generate --checkpoint exports/tiny-mac --prompt-file long.txt --temperature 0

The prompt is consumed in pieces with the model's state carried (the memory, the window's KV
cache, MAC's segment), so it may be far longer than the attention window; each new token then
costs one step. ``--no-cache`` re-runs the whole sequence for every token (the reference the
cached path must match). The continuation goes to stdout, timings and tokens/s to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from titans_train.cli_common import add_source_args, tool_main, tool_parser
from titans_train.load import add_placement_args, dump_json, open_checkpoint, place

DESCRIPTION = __doc__.split("\n\n")[0]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_source_args(ap, data_help="shard manifest naming the tokenizer (default: the run's)")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="read the prompt from this file ('-' = stdin)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="re-run the sequence every token")
    ap.add_argument("--prefill-chunk", type=int, help="prompt tokens per forward")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop at the tokenizer's EOS")
    ap.add_argument("--json", help="also write ids, text and timings here")
    add_placement_args(ap)


def parse_args(argv: list[str] | None, prog: str = "titans-generate") -> argparse.Namespace:
    return tool_parser(prog, DESCRIPTION, add_arguments).parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    return Path(args.prompt_file).read_text(encoding="utf-8")


def run_args(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.checkpoint, args.run, args.data)
    model = place(checkpoint.model(), args.device, args.dtype)
    tok = checkpoint.tokenizer()
    text = read_prompt(args)
    ids = torch.from_numpy(tok.encode_batch([text])[0].astype("int64"))
    if len(ids) == 0:
        ids = torch.tensor([tok.eos_id])  # an empty prompt starts a new document
    ids = ids.to(next(model.parameters()).device)
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
        eos_id=tok.eos_id if args.stop_at_eos else None,
        prefill_chunk=args.prefill_chunk,
    )
    seconds = time.perf_counter() - t0
    new = out[len(ids) :].tolist()
    completion = tok.decode(new)
    sys.stdout.write(completion + "\n")
    stats = {
        "prompt_tokens": len(ids),
        "new_tokens": len(new),
        "seconds": seconds,
        "tokens_per_second": len(new) / seconds,
        "cache": not args.no_cache,
    }
    print(
        f"{len(ids)} prompt + {len(new)} new tokens in {seconds:.2f} s: "
        f"{stats['tokens_per_second']:.1f} new tokens/s "
        f"({(len(ids) + len(new)) / seconds:.0f} tokens/s processed), "
        f"{'cached state' if stats['cache'] else 'no cache'}",
        file=sys.stderr,
    )
    if args.json:
        dump_json(
            {**stats, "ids": new, "text": completion, "source": str(checkpoint.path)}, args.json
        )
    return 0


def main(argv: list[str] | None = None, prog: str = "titans-generate") -> int:
    return tool_main(prog, DESCRIPTION, add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
