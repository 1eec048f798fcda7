"""`titans-train`: the one front door. `titans-train COMMAND ...` runs a subcommand;
`titans-train --config X.yaml key=value ...` (no command) trains. The older console scripts
(titans-data, titans-eval, titans-generate, titans-export) run the same functions."""

from __future__ import annotations

from titans_train.cli_common import Command, dispatch

DESCRIPTION = (
    "Pretrain Titans language models. Training: titans-train --config EXPERIMENT.yaml "
    "[key=value ...], launched with torchrun (launch/torchrun.sh) for several processes."
)
# data_pipelines is named, not imported: the runtime never depends on the offline package.
COMMANDS = {
    "train": Command("titans_train.cli:train", "train a model (the default command)"),
    "describe": Command(
        "titans_train.describe:main", "parameter count and FLOPs per token of a model config"
    ),
    "data": Command("data_pipelines.cli:main", "offline data jobs (= titans-data)"),
    "eval": Command(
        "titans_train.evaluate:main", "perplexity and recall of a checkpoint (= titans-eval)"
    ),
    "generate": Command(
        "titans_train.generate:main", "sample from a checkpoint or export (= titans-generate)"
    ),
    "export": Command(
        "titans_train.export:main", "checkpoint -> safetensors + config.json (= titans-export)"
    ),
}


def train(argv: list[str], prog: str) -> None:
    """The trainer parses its own command line (train.py: --config and key=value overrides)."""
    from titans_train.train import main as train_main

    train_main(argv)


def main(argv: list[str] | None = None) -> int:
    return dispatch("titans-train", DESCRIPTION, COMMANDS, argv, default="train")


if __name__ == "__main__":
    raise SystemExit(main())
