"""What the command-line tools share.

- One dispatch pattern: a command with subcommands (``titans-train``, ``titans-data``) is a
  registry of ``Command``s, each naming a ``main(argv, prog)`` that is imported only when chosen.
  The console scripts (``titans-eval`` = ``titans-train eval``, ...) call the same functions.
- One way to run a tool: its parser (module docstring, defaults shown), then its work, with
  the errors a user can fix (a bad path, file, key or value) printed as one line
  ``<prog>: error: ...`` and exit status 2; anything else is a bug and keeps its traceback.
- The ``--checkpoint/--run/--data`` arguments of eval, generate and export.

A subcommand's module is imported only when it runs, and this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

USAGE_ERROR = 2  # argparse's own status for a bad command line
HELP = ("-h", "--help")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default."""


@dataclass(frozen=True)
class Command:
    """A subcommand, imported only when chosen. ``target`` is either ``"module:function"`` (as in
    a console script; the function takes ``(argv, prog)`` and returns an exit status) or a tool
    module: its docstring, ``add_arguments(parser)`` and ``run_args(args)`` make the command
    (``tool_main``). ``summary`` is its line in the parent's --help."""

    target: str
    summary: str

    def load(self) -> Callable[[list[str], str], int | None]:
        name, _, function = self.target.partition(":")
        module = importlib.import_module(name)
        if function:
            return getattr(module, function)
        return lambda argv, prog: tool_main(
            prog, module.__doc__, module.add_arguments, module.run_args, argv
        )


def overview(prog: str, description: str, commands: Mapping[str, Command], default: str | None):
    """The parser that prints ``prog --help`` (every subcommand and its summary) and rejects an
    unknown or missing subcommand; the subcommands' own arguments are parsed by them."""
    epilog = None
    if default:
        epilog = f"Without a command, {prog} runs `{prog} {default}` with the same arguments."
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands.items():
        sub.add_parser(name, help=command.summary, add_help=False)
    return parser


def dispatch(
    prog: str,
    description: str,
    commands: Mapping[str, Command],
    argv: Sequence[str] | None = None,
    default: str | None = None,
) -> int:
    """Run the subcommand ``argv[0]`` names with the rest of ``argv``; with ``default``, argv
    that names no subcommand goes to that one whole (``titans-train --config X.yaml``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands:
        name, rest = argv[0], argv[1:]
    elif default is not None and argv and argv[0] not in HELP:
        name, rest = default, argv
    else:  # -h, nothing, or an unknown name: argparse prints help (0) or the usage error (2)
        overview(prog, description, commands, default).parse_args(argv[:1])
        raise AssertionError("unreachable: the overview parser exits")
    return commands[name].load()(rest, f"{prog} {name}") or 0


def tool_parser(
    prog: str, description: str | None, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """What a tool reports as ``<prog>: error: ...``: every one names the path, key or value."""
    from titans_train.checkpoint import CheckpointError
    from titans_train.data.errors import DataError

    return (CheckpointError, DataError, FileExistsError, FileNotFoundError, ValueError)


def run_tool(
    prog: str, args: argparse.Namespace, run_args: Callable[[argparse.Namespace], int | None]
) -> int:
    """``run_args(args)``'s exit status, or USAGE_ERROR after one line naming what is wrong."""
    try:
        return run_args(args) or 0
    except user_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USAGE_ERROR


def tool_main(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_args: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """A tool's whole ``main``: parse ``argv`` (default sys.argv[1:]) and run it."""
    args = tool_parser(prog, description, add_arguments).parse_args(argv)
    return run_tool(prog, args, run_args)


def add_source_args(ap: argparse.ArgumentParser, data_help: str) -> None:
    """--checkpoint, --run and --data: where the model (and its tokenizer) come from."""
    ap.add_argument("--checkpoint", required=True, help="checkpoint, run dir, latest, or export")
    ap.add_argument("--run", help="run directory for --checkpoint latest")
    ap.add_argument("--data", help=data_help)
