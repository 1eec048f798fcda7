"""Config composition and validation: every bad input names its key before anything starts."""

import pytest

from titans_train.config import ConfigError, to_yaml
from titans_train.config_load import load_config, validate

ROOT_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def manifest_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    return d


def write_experiment(tmp_path, body: str):
    exp = tmp_path / "exp.yaml"
    exp.write_text(body)
    return exp


def test_presets_experiment_and_overrides_compose(tmp_path, manifest_dir):
    exp = tmp_path / "experiments" / "e.yaml"
    exp.parent.mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("variant: mag\ndim: 64\nheads: 4\nwindow: 32\n")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "z3.yaml").write_text("stage: 3\n")
    exp.write_text(
        "presets: {model: small, zero: z3}\n"
        f"data: {{train: [{manifest_dir}]}}\n"
        "model: {depth: 3}\ntrain: {seq_len: 64}\n"
    )
    cfg = load_config(exp, ["train.max_steps=7", "model.heads=8"])
    assert (cfg.model.variant, cfg.model.dim, cfg.model.depth, cfg.model.heads) == ("mag", 64, 3, 8)
    assert (cfg.zero.stage, cfg.train.max_steps, cfg.train.seq_len) == (3, 7, 64)
    assert "variant: mag" in to_yaml(cfg)


def test_shipped_experiment_loads_when_data_exists(manifest_dir):
    cfg = load_config(
        ROOT_CONFIGS / "experiments" / "tiny_mac.yaml", [f"data.train=[{manifest_dir}]"]
    )
    assert cfg.model.variant == "mac" and cfg.zero.stage == 2


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.window=512", "model.window"),  # larger than train.seq_len (MAG)
        ("model.dim=30", "model.dim"),  # not divisible by heads
        ("train.global_batch=7", "train.global_batch"),  # not divisible by micro_batch 2
        ("train.micro_batch=0", "train.micro_batch"),
        ("zero.stage=4", "zero.stage"),
        ("optim.schedule=linear", "optim.schedule"),
        ("data.mix=even", "data.mix"),
        ("model.windw=3", "windw"),  # unknown key
        ("trian.max_steps=3", "trian"),  # unknown section
        ("train.max_steps=abc", "train.max_steps"),  # wrong type
        ("checkpoint.resume=/nope/step_00000001", "checkpoint.resume"),
        ("zero.offload_optimizer=true zero.stage=0", "zero.offload_optimizer"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, manifest_dir, override, key):
    exp = write_experiment(
        tmp_path,
        "model: {variant: mag, dim: 32, heads: 4, window: 16}\n"
        f"data: {{train: [{manifest_dir}]}}\n"
        "train: {seq_len: 64, global_batch: 8, micro_batch: 2}\n",
    )
    with pytest.raises(ConfigError, match=key):
        load_config(exp, override.split())


def test_missing_manifest_names_the_key(tmp_path):
    exp = write_experiment(tmp_path, f"data: {{train: [{tmp_path / 'nowhere'}]}}\n")
    with pytest.raises(ConfigError, match=r"data\.train\[0\].*nowhere"):
        load_config(exp)


def test_global_batch_vs_world_size(tmp_path, manifest_dir):
    exp = write_experiment(
        tmp_path,
        f"data: {{train: [{manifest_dir}]}}\ntrain: {{global_batch: 6, micro_batch: 2}}\n",
    )
    cfg = load_config(exp)
    validate(cfg, exp, world_size=3)
    with pytest.raises(ConfigError, match=r"train\.global_batch.*world_size x micro_batch"):
        validate(cfg, exp, world_size=2)


def test_unknown_preset_and_missing_file(tmp_path, manifest_dir):
    exp = write_experiment(tmp_path, "presets: {model: nosuch}\n")
    with pytest.raises(ConfigError, match="presets.model"):
        load_config(exp)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_fails_fast_naming_the_key(manifest_dir):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "titans_train.cli",
        "--config",
        str(ROOT_CONFIGS / "experiments" / "tiny_mac.yaml"),
        f"data.train=[{manifest_dir}]",
        "model.dim=30",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT_CONFIGS.parent)
    assert proc.returncode != 0
    assert "config error" in proc.stderr and "model.dim" in proc.stderr


def test_data_mix_auto_takes_the_checkpoints_and_an_explicit_other_is_a_change(manifest_dir):
    from titans_train.config import public_dict, resolve_mix
    from titans_train.train_state import config_changes

    def cfg(*extra):
        exp = ROOT_CONFIGS / "experiments" / "tiny_mac.yaml"
        return load_config(exp, [f"data.train=[{manifest_dir}]", *extra])

    assert cfg().data.mix == "auto" and resolve_mix("auto", None) == "stratified"
    old = public_dict(cfg())
    del old["data"]["mix"]  # as a checkpoint saved before the key existed stores it
    assert resolve_mix("auto", old) == "shuffled"
    assert config_changes(cfg(), old) == config_changes(cfg("data.mix=shuffled"), old) == ([], [])
    assert config_changes(cfg("data.mix=stratified"), old)[0] == [
        "data.mix: 'shuffled' -> 'stratified'"
    ]
    new = public_dict(cfg("data.mix=stratified"))  # a run saves its resolved mix
    assert config_changes(cfg(), new) == ([], [])
    assert config_changes(cfg("data.mix=shuffled"), new)[0] == [
        "data.mix: 'stratified' -> 'shuffled'"
    ]
