"""``titans-export``: a training checkpoint of any ZeRO stage -> one portable model directory.

    titans-export --checkpoint runs/tiny-mac --out exports/tiny-mac [--data MANIFEST]

writes ``model.safetensors`` (fp32, or ``--dtype bf16|fp16``; tied tensors once),
``config.json`` (the model config, the tokenizer identity and where the weights came from) and,
for a tokenizers-based tokenizer, the
``tokenizer.json`` the shards were made with. ``pretrained.load_pretrained(out)`` loads it with
torch and safetensors alone; ``titans-eval`` and ``titans-generate`` accept it as --checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from titans_train.cli_common import add_source_args, tool_main, tool_parser
from titans_train.data.tokenizer import TOKENIZER_FILE, recorded_file
from titans_train.load import (
    DTYPES,
    Checkpoint,
    add_placement_args,
    open_checkpoint,
)
from titans_train.models import TitansLM
from titans_train.pretrained import CONFIG_FILE, save_pretrained


def export(checkpoint: Checkpoint, model: TitansLM, out: str | Path, dtype: str = "fp32") -> Path:
    """Write ``model`` (loaded from ``checkpoint``) as an exported directory (weights stored in
    ``dtype``); the tokenizer goes along when one is known."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise FileExistsError(f"{out} exists and is not an exported model; choose another --out")
    identity = checkpoint.tokenizer_identity
    # Checked before anything is written: the recorded name is untrusted (a plain file name).
    src = None
    if identity and identity.get("file"):
        src = recorded_file(identity, checkpoint.tokenizer_dir, checkpoint.path)
    extra = {
        "tokenizer": identity,
        "source": {
            "checkpoint": str(checkpoint.path),
            "step": checkpoint.step,
            "git_sha": checkpoint.state.get("git_sha"),
            "wandb_run_id": checkpoint.state.get("wandb_run_id"),
        },
    }
    save_pretrained(model, out, extra, dtype=DTYPES[dtype])
    if src is not None:
        if src.resolve() != (out / TOKENIZER_FILE).resolve():
            shutil.copyfile(src, out / TOKENIZER_FILE)
        checkpoint.tokenizer()  # the copy is checked against the recorded sha256 on the way in
    return out


DESCRIPTION = __doc__.split("\n\n")[0]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_source_args(ap, data_help="shard manifest naming the tokenizer (default: the run's)")
    ap.add_argument("--out", required=True, help="output directory")
    # No --device: export computes nothing; the weights are cast on the CPU and written.
    add_placement_args(ap, device=False)


def parse_args(argv: list[str] | None, prog: str = "titans-export") -> argparse.Namespace:
    return tool_parser(prog, DESCRIPTION, add_arguments).parse_args(argv)


def run_args(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.checkpoint, args.run, args.data)
    if checkpoint.tokenizer_identity is None:
        print(
            f"titans-export: warning: the tokenizer of {checkpoint.path} was not found (its "
            "data paths are not reachable from here); pass --data MANIFEST to include it",
            file=sys.stderr,
        )
    model = checkpoint.model()
    out = export(checkpoint, model, args.out, args.dtype)
    variant, n = checkpoint.model_config.variant, model.num_params()
    print(f"exported {checkpoint.path} ({variant}, {n / 1e6:.2f}M params) to {out}")
    return 0


def main(argv: list[str] | None = None, prog: str = "titans-export") -> int:
    return tool_main(prog, DESCRIPTION, add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
