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

from titans_train.checkpoint import CheckpointError
from titans_train.data.errors import DataError
from titans_train.load import DTYPES, TOKENIZER_FILE, ModelSource, add_placement_args, open_model
from titans_train.pretrained import CONFIG_FILE, save_pretrained


def export(source: ModelSource, out: str | Path, dtype: str = "fp32") -> Path:
    """Write ``source`` as an exported directory (weights stored in ``dtype``); the tokenizer goes
    along when one is known."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise FileExistsError(f"{out} exists and is not an exported model; choose another --out")
    identity = source.tokenizer_identity
    extra = {
        "tokenizer": identity,
        "source": {
            "checkpoint": str(source.path),
            "step": source.step,
            "git_sha": source.trainer_state.get("git_sha"),
            "wandb_run_id": source.trainer_state.get("wandb_run_id"),
        },
    }
    save_pretrained(source.model, out, extra, dtype=DTYPES[dtype])
    if identity and identity.get("file"):
        src = source.tokenizer_dir / identity["file"]
        if src.resolve() != (out / TOKENIZER_FILE).resolve():
            shutil.copyfile(src, out / TOKENIZER_FILE)
        source.tokenizer()  # the copy is checked against the recorded sha256 on the way in
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="titans-export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True, help="checkpoint, run dir, or latest (+--run)")
    ap.add_argument("--run", help="run directory for --checkpoint latest")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--data", help="shard manifest naming the tokenizer (default: the run's)")
    # No --device: export computes nothing; the weights are cast on the CPU and written.
    add_placement_args(ap, device=False)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source = open_model(args.checkpoint, args.run, args.data)
        if source.tokenizer_identity is None:
            print(
                f"titans-export: warning: the tokenizer of {source.path} was not found (its "
                "data paths are not reachable from here); pass --data MANIFEST to include it",
                file=sys.stderr,
            )
        out = export(source, args.out, args.dtype)
    except (CheckpointError, DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"titans-export: error: {e}", file=sys.stderr)
        return 2
    n = source.model.num_params()
    print(f"exported {source.path} ({source.model.cfg.variant}, {n / 1e6:.2f}M params) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
