"""checkpoint.init_from: a new run starts from another run's weights (fine-tuning, curricula),
with its own optimizer, step, data position and RNG; a run with its own checkpoint resumes from
that instead; what cannot be loaded is named."""

import pytest
import torch
from trainer_helpers import in_process_trainer, losses

from titans_train.checkpoint import CheckpointError


def run(demo_shards, process_group, run_dir, steps, *extra, setup_only=False):
    trainer = in_process_trainer(demo_shards, run_dir, steps, *extra, process_group=process_group)
    if setup_only:
        assert trainer.setup()
    else:
        trainer.fit()
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


@pytest.fixture
def source(demo_shards, process_group, tmp_path):
    """A finished 3-step run and its final weights."""
    trainer = run(demo_shards, process_group, tmp_path / "source", 3, "optim.lr=3e-3")
    return tmp_path / "source", weights(trainer)


def test_a_new_run_starts_from_the_weights(demo_shards, process_group, tmp_path, source, capsys):
    src, want = source
    # the forget bias sets an initial value the loaded weights replace: allowed, and reported
    extra = [f"checkpoint.init_from={src}", "model.memory_forget_bias=-6"]
    trainer = run(demo_shards, process_group, tmp_path / "new", 2, *extra, setup_only=True)
    got = weights(trainer)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert trainer.step == 0 and trainer.tokens == 0 and not trainer.resumed
    assert trainer.loader.position.samples == 0
    err = capsys.readouterr().err
    assert f"checkpoint.init_from: weights of {src}" in err and "(step 3)" in err
    assert "memory_forget_bias" in err


def test_it_trains_on_from_there(demo_shards, process_group, tmp_path, source):
    """The first loss is the source model's on the new run's first batch: 5.44 against a fresh
    model's 5.80 (the source trained 3 steps at 3e-3; margin asserted 0.05)."""
    src, _ = source
    run(demo_shards, process_group, tmp_path / "fresh", 2, "optim.lr=3e-3")
    run(
        demo_shards,
        process_group,
        tmp_path / "new",
        2,
        "optim.lr=3e-3",
        f"checkpoint.init_from={src}",
    )
    fresh, new = losses(tmp_path / "fresh"), losses(tmp_path / "new")
    assert new[1] < fresh[1] - 0.05, (fresh, new)


def test_a_run_with_its_own_checkpoint_resumes_from_it(
    demo_shards, process_group, tmp_path, source, capsys
):
    src, want = source
    own = run(demo_shards, process_group, tmp_path / "new", 2, f"checkpoint.init_from={src}")
    trained = weights(own)
    capsys.readouterr()
    again = run(
        demo_shards, process_group, tmp_path / "new", 4, f"checkpoint.init_from={src}",
        setup_only=True,
    )  # fmt: skip
    assert again.step == 2 and again.resumed
    for name, t in weights(again).items():
        torch.testing.assert_close(t, trained[name], rtol=0, atol=0, msg=name)
    assert "checkpoint.init_from not used: this run resumes from" in capsys.readouterr().err


def test_what_cannot_be_loaded_is_named(demo_shards, process_group, tmp_path, source):
    src, _ = source
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=rf"checkpoint\.init_from={missing}: .*nowhere"):
        run(demo_shards, process_group, tmp_path / "a", 2, f"checkpoint.init_from={missing}")
    wider = "model.dim=64"  # another width: every matrix has another shape
    with pytest.raises(CheckpointError, match=r"checkpoint\.init_from=.*do not match.*\[32"):
        run(demo_shards, process_group, tmp_path / "b", 2, f"checkpoint.init_from={src}", wider)
