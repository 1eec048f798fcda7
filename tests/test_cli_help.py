"""Every command's --help shows the defaults (a newcomer should not have to read the source), and
`titans-train` is the one front door: every tool is a subcommand, the old console scripts are
aliases of the same functions, and `titans-train --config X.yaml` (no command) still trains."""

import re
from pathlib import Path

import pytest

from data_pipelines import cli as data_cli
from titans_train import cli, describe, evaluate, export, generate

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.mark.parametrize(
    "main,argv,expected",
    [
        (evaluate.parse_args, ["--help"], "(default: 50)"),  # --samples
        (generate.parse_args, ["--help"], "(default: "),
        (export.parse_args, ["--help"], "(default: "),
        (describe.main, ["--help"], "(default: 4096)"),  # --seq-len
        (data_cli.main, ["tokenize", "--help"], "(default: 1024)"),  # --seq-len
        (cli.main, ["data", "tokenize", "--help"], "(default: 1024)"),
        (cli.main, ["eval", "--help"], "(default: 50)"),
        (cli.main, ["describe", "--help"], "(default: 4096)"),
    ],
)
def test_help_shows_defaults(capsys, main, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert expected in capsys.readouterr().out


def test_eval_help_lists_the_suites(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "passkey" in out and "mqar" in out


def test_front_door_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "describe", "data", "eval", "generate", "export"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name
    assert set(cli.COMMANDS) == {"train", "describe", "data", "eval", "generate", "export"}


@pytest.mark.parametrize("name", ["train", "describe", "data", "eval", "generate", "export"])
def test_every_subcommand_answers_help(capsys, name):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    # train's parser is the trainer's own: its usage is the default form, titans-train --config
    want = "usage: titans-train [-h] --config" if name == "train" else f"usage: titans-train {name}"
    assert usage.startswith(want), usage


def test_no_command_trains_and_bad_commands_are_usage_errors(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    for argv in (["--config", str(missing)], ["train", "--config", str(missing)]):
        with pytest.raises(SystemExit) as e:  # the trainer's own config error, before start-up
            cli.main(argv)
        assert "config error" in str(e.value.code) and str(missing) in str(e.value.code)
    for main, argv in [(cli.main, []), (data_cli.main, []), (data_cli.main, ["bogus"])]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_tools_share_one_error_rule(tmp_path, capsys):
    """A user's mistake is one line naming it and exit status 2, under either name."""
    missing = tmp_path / "none"
    assert cli.main(["eval", "--checkpoint", str(missing)]) == 2
    assert evaluate.main(["--checkpoint", str(missing)]) == 2
    assert cli.main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"titans-train eval: error: no such checkpoint directory: {missing}",
        f"titans-eval: error: no such checkpoint directory: {missing}",
        f"titans-train export: error: no such checkpoint directory: {missing}",
    ]


def test_console_scripts_are_aliases_of_the_subcommands():
    """setup.py's console scripts stay, and each runs what its titans-train subcommand runs."""
    scripts = dict(re.findall(r'"(titans-[\w-]+)=([\w.:]+)"', SETUP.read_text()))
    assert scripts.pop("titans-train") == "titans_train.cli:main"
    assert scripts == {
        f"titans-{n}": cli.COMMANDS[n].target for n in ("data", "eval", "generate", "export")
    }
