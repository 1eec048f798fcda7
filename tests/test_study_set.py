"""benchmarks/study.py --set: model overrides for every variant, parsed and checked, and the
SwiGLU width re-matched so the parameter count stays equal."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402


def test_set_parses_numbers_and_names():
    got = study.parse_set(["memory_forget_bias=-8", "memory_heads=2", "mac_write=input"])
    assert got == {"memory_forget_bias": -8, "memory_heads": 2, "mac_write": "input"}


@pytest.mark.parametrize("item", ["memory_forget_bias", "no_such_key=1"])
def test_set_refuses_a_bad_item(item):
    with pytest.raises(SystemExit, match="--set"):
        study.parse_set([item])


def test_set_keeps_the_parameter_count():
    target = TitansLM(ModelConfig(variant="mac", **study.MODEL)).num_params()
    plain, _ = study.match_ffn("mag", target)
    ffn, params = study.match_ffn("mag", target, {"memory_heads": 1})
    assert ffn != plain and abs(params - target) / target < 0.01


def test_eval_lengths_are_multiples_of_the_training_length():
    assert study.eval_lengths("1,2,4,8", 128) == "128,256,512,1024"
    for bad in ("", "2x", "0,2", "1.5"):
        with pytest.raises(SystemExit, match=f"--eval-lengths {bad!r}"):
            study.eval_lengths(bad, 128)


def test_every_variant_builds_at_the_study_size():
    """Each name --variants accepts is a model the study can build and size-match."""
    target = TitansLM(ModelConfig(variant="mac", **study.MODEL)).num_params()
    for name in [*study.VARIANTS, *study.EXTRA_VARIANTS]:
        _, params = study.match_ffn(name, target)
        assert abs(params - target) / target < 0.05, name


def test_a_recall_share_of_one_trains_on_the_recall_shards_alone():
    data = (Path("c"), Path("r"))
    train, weights = study.data_overrides(data, 0.9)
    assert train == "data.train=[c,r]" and weights.startswith("data.weights=[0.09999")
    assert study.data_overrides(data, 1.0) == ["data.train=[r]", "data.weights=[1.0]"]


@pytest.mark.parametrize(
    "argv", [["--burn-in", "3"], ["--burn-in", "3", "--answer-loss", "--document-masking", "off"]]
)
def test_a_burn_in_needs_answer_masks_and_document_masking(argv, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert "--burn-in 3" in capsys.readouterr().err


def test_burn_in_rows_put_each_example_after_a_used_memory():
    """Each row: filler (its own document), then 0..B tokens of noise and the example in one
    document; the loss on the example's answers only."""
    from study_data import burn_in_rows, recall_examples

    from titans_train.synthetic import NOISE

    examples = recall_examples(128, 40, seed=1, mqar_share=0)
    rows, masks, starts = burn_in_rows(examples, 384, seed=1)
    used = set()
    for ex, row, mask, start in zip(examples, rows, masks, starts):
        assert len(row) == len(mask) == 512 and row[384:] == ex.tokens
        assert not any(mask[:384]) and sum(mask) == sum(e - s for s, e in ex.answers)
        filler = start[0] if start else 0
        for piece in (row[:filler], row[filler:384]):  # each a slice of the noise paragraph
            assert bytes(piece).decode() in NOISE * 12
        used.add(384 - filler)
    assert len(used) > 30 and min(used) < 96 and max(used) > 288  # spread over 0..B
    assert burn_in_rows(examples, 384, seed=1) == (rows, masks, starts)  # seeded


def test_far_needles_lie_in_the_burn_in_and_are_asked_after_it():
    from study_data import far_needles

    needle = "The pass key is"
    at = []
    for ex in far_needles(128, 384, 24, seed=1):
        text = bytes(ex.tokens).decode()
        start = text.index(needle)
        end = text.index(" is the pass key. ", start) + len(" is the pass key. ")
        assert len(ex.tokens) == 512 and end <= 384 and ex.answers == [(506, 512)]
        at.append(start)
    assert min(at) < 64 and max(at) > 224  # spread over the burn-in
    with pytest.raises(SystemExit):
        study.parse_args(["--far-needles", "0.5"])  # without --burn-in


def test_init_from_needs_a_run_of_every_variant(tmp_path, capsys):
    (tmp_path / "mal").mkdir()
    args = study.parse_args(["--variants", "mal", "--init-from", str(tmp_path)])
    assert args.init_from == tmp_path
    with pytest.raises(SystemExit):
        study.parse_args(["--variants", "mal,mag", "--init-from", str(tmp_path)])
    assert "no run 'mag' there" in capsys.readouterr().err
