"""`titans-data`: one command for the offline data jobs (docs/data.md, "CLIs")."""

from __future__ import annotations

import argparse
import importlib
import sys

from titans_train.data.errors import DataError

COMMANDS = {
    "tokenize": "data_pipelines.tokenize",
    "train-tokenizer": "data_pipelines.train_tokenizer",
    "verify": "data_pipelines.verify",
    "inspect": "data_pipelines.inspect",
    "demo": "data_pipelines.demo",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="titans-data", description="Corpus -> tokenizer -> packed webdataset shards."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(run=module.run_args)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as exn:
        print(f"titans-data {args.command}: error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
