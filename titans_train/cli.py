"""`titans-train` entry point: dispatches to its subcommands."""

from __future__ import annotations

import sys

USAGE = """usage: titans-train --config EXPERIMENT.yaml [key=value ...]
       titans-train describe MODEL.yaml [key=value ...] [--seq-len N]

  (default)  train; launch with torchrun for several processes
  describe   parameter count and FLOPs per token of a model config
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "describe":
        from titans_train.describe import main as describe_main

        describe_main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write(USAGE)
        sys.exit(0 if argv else 2)
    from titans_train.train import main as train_main

    train_main(argv)


if __name__ == "__main__":
    main()
