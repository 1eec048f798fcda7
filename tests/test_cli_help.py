"""Every command's --help shows the defaults (a newcomer should not have to read the source)."""

import pytest

from data_pipelines import cli as data_cli
from titans_train import describe, evaluate, export, generate


@pytest.mark.parametrize(
    "main,argv,expected",
    [
        (evaluate.parse_args, ["--help"], "(default: 50)"),  # --samples
        (generate.parse_args, ["--help"], "(default: "),
        (export.parse_args, ["--help"], "(default: "),
        (describe.main, ["--help"], "(default: 4096)"),  # --seq-len
        (data_cli.main, ["tokenize", "--help"], "(default: 1024)"),  # --seq-len
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
