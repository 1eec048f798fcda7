"""Execution apart from maths: RuntimeConfig, the deprecated ModelConfig/YAML keys, activation
checkpointing applied from outside, and the parameter policies declared by their modules."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

from titans_train.config import Config, ConfigError, to_dict, upgrade_legacy
from titans_train.config_load import load_config, load_model_config
from titans_train.engine import param_groups
from titans_train.models import (
    ModelConfig,
    NeuralMemory,
    RuntimeConfig,
    TitansLM,
    apply_activation_checkpointing,
)
from titans_train.models.runtime import resolve_memory_backend

DT = torch.float64
VARIANTS = {
    "mac": dict(variant="mac"),
    "mac-memory_tokens": dict(variant="mac", mac_retrieval="memory_tokens"),
    "mag": dict(variant="mag"),
    "mal": dict(variant="mal"),
    "lmm": dict(variant="lmm"),
    "transformer": dict(variant="transformer"),
    "transformer-full": dict(variant="transformer", window=None),
    # tied head, per-layer gates, linear memory, no persistent tokens
    "mac-tied": dict(variant="mac", tie_embeddings=True, memory_per_layer_gates=True),
    "mag-linear": dict(variant="mag", memory_depth=1, num_persistent=0),
}


def tiny_cfg(**kw) -> ModelConfig:
    cfg = dict(vocab_size=61, dim=32, depth=2, heads=4, window=6, segment_len=12, chunk_size=4)
    cfg.update(num_persistent=4, num_memory_tokens=3)
    return ModelConfig(**{**cfg, **kw})


# -- RuntimeConfig and the deprecated keys -------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(attn_backend="cudnn"), "runtime.attn_backend='cudnn'"),
        (dict(memory_backend="fast"), "runtime.memory_backend='fast'"),
        (dict(memory_checkpoint_group=-1), "runtime.memory_checkpoint_group=-1"),
    ],
)
def test_runtime_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**kw)


def test_model_config_keeps_accepting_execution_keys_with_a_warning():
    with pytest.warns(DeprecationWarning, match="attn_backend, memory_checkpoint_group, memory_c"):
        cfg = tiny_cfg(attn_backend="sdpa", memory_compile=True, memory_checkpoint_group=0)
    assert cfg.legacy_runtime == dict(
        attn_backend="sdpa", memory_backend="compile", memory_checkpoint_group=0
    )
    assert not {"attn_backend", "memory_compile", "memory_checkpoint_group"} & set(cfg.to_dict())
    model = TitansLM(cfg)  # no runtime: the deprecated keys say how it runs
    assert model.runtime == RuntimeConfig("sdpa", "compile", 0)
    assert model.blocks[0].attn.backend == "sdpa"
    assert (model.blocks[0].memory.backend, model.blocks[0].memory.checkpoint_group) == (
        "compile",
        0,
    )
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts"):
        tiny_cfg(memory_compile=True, memory_backend="eager")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="model.memory_backend"):
        tiny_cfg(memory_backend="fast")


def test_stored_configs_with_execution_keys_load_silently():
    old = {**tiny_cfg().to_dict(), "attn_backend": "flex", "memory_compile": False}
    old["memory_checkpoint_group"] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_dict(old)
    assert cfg == tiny_cfg()
    assert TitansLM(cfg).runtime == RuntimeConfig("flex", "eager", 4)
    with pytest.raises(TypeError, match="windw"):
        ModelConfig.from_dict({"windw": 3})


def test_runtime_reaches_attention_and_memory():
    runtime = RuntimeConfig(attn_backend="flex", memory_backend="eager", memory_checkpoint_group=3)
    model = TitansLM(tiny_cfg(variant="mac"), runtime)
    assert {b.attn.backend for b in model.blocks} == {"flex"}
    assert {(b.memory.backend, b.memory.checkpoint_group) for b in model.blocks} == {("eager", 3)}
    assert TitansLM(tiny_cfg()).runtime == RuntimeConfig()


def test_memory_backend_auto_is_eager_on_cpu(monkeypatch):
    assert resolve_memory_backend("auto", torch.device("cpu"), [16, 64, 16], 16) == "eager"
    assert resolve_memory_backend("compile", torch.device("cpu")) == "compile"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel's CPU tests set it
    x = torch.randn(1, 16, 16)
    with pytest.raises(ValueError, match="runtime.memory_backend='triton': .*TRITON_INTERPRET"):
        NeuralMemory(16, 1, backend="triton")(x)


# -- activation checkpointing from outside ------------------------------------------------------
@pytest.mark.parametrize("name", ["mac", "mac-memory_tokens", "mal", "transformer"])
def test_activation_checkpointing_keeps_names_and_numbers(name):
    def run(ac: bool):
        torch.manual_seed(0)
        model = TitansLM(tiny_cfg(**VARIANTS[name])).to(DT)
        if ac:
            apply_activation_checkpointing(model)
            apply_activation_checkpointing(model)  # idempotent
        calls = []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda m, a: calls.append(m))
        x = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
        out = model(x, targets=x)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return model, out.logits.detach(), grads, len(calls)

    plain, logits, grads, n_plain = run(False)
    model, logits_ac, grads_ac, n_ac = run(True)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert (n_plain, n_ac) == (2, 4)  # each block ran again in backward
    assert torch.equal(logits_ac, logits)
    assert all(torch.equal(grads_ac[k], grads[k]) for k in grads)
    assert not hasattr(model, "activation_checkpointing")
    plain.load_state_dict(model.state_dict())  # checkpoints and exports stay interchangeable
    with torch.no_grad():  # inference through the hooks: generation, eval
        ids = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert ids.shape == (1, 7)


# -- policies declared by the owning modules ----------------------------------------------------
def name_rule_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """engine.param_groups before the policy moved into the modules: a rule on names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        parts = name.split(".")
        skip = p.ndim < 2 or any(s in parts for s in ("persistent", "mem_queries", "init_weights"))
        (no_decay if skip else decay).append(name)
    return decay, no_decay


def name_rule_init(model: TitansLM) -> None:
    """TitansLM.reset_parameters before the policy moved into the modules."""
    std = model.cfg.init_std
    out_std = std / math.sqrt(2 * model.cfg.depth)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            residual_out = name.rsplit(".", 1)[-1] in ("w2", "attn_out", "to_out", "out")
            nn.init.normal_(module.weight, std=out_std if residual_out else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
    for module in model.modules():
        if isinstance(module, NeuralMemory):
            module.reset_parameters(std)
    for block in model.blocks:
        if block.persistent is not None:
            nn.init.normal_(block.persistent, std=std)
        if getattr(block, "mem_queries", None) is not None:
            nn.init.normal_(block.mem_queries)


@pytest.mark.parametrize("name", VARIANTS)
def test_policies_equal_the_old_name_rules(name):
    cfg = tiny_cfg(**VARIANTS[name])
    torch.manual_seed(0)
    model = TitansLM(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    got = tuple([names[id(p)] for p in g["params"]] for g in groups)
    assert got == name_rule_groups(model)
    assert got[1] and any("init_weights" in n for n in got[1]) == (cfg.variant != "transformer")

    torch.manual_seed(0)
    old = TitansLM(cfg)
    torch.manual_seed(0)
    name_rule_init(old)  # the same random draws in the same order
    torch.manual_seed(0)
    model.reset_parameters()
    for key, value in old.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# -- the config tree ----------------------------------------------------------------------------
def test_old_yaml_keys_land_in_runtime(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.yaml").write_text(
        "variant: lmm\ndim: 64\nheads: 4\nwindow: 8\nmemory_compile: true\n"
    )
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "z.yaml").write_text("stage: 1\nactivation_checkpointing: true\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"presets: {{model: m, zero: z}}\ndata: {{train: [{data}]}}\n"
        "model: {attn_backend: sdpa}\ntrain: {seq_len: 64}\n"
    )
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(exp, ["model.memory_checkpoint_group=2"])
    said = " ".join(str(w.message) for w in caught)
    for key in ("model.memory_compile", "zero.activation_checkpointing", "model.attn_backend"):
        assert key in said
    assert "the command line: model.memory_checkpoint_group" in said
    assert cfg.runtime == RuntimeConfig("sdpa", "compile", 2, True)
    tree = to_dict(cfg)
    assert "attn_backend" not in tree["model"] and "activation_checkpointing" not in tree["zero"]
    # A later layer wins as for any key; both spellings in one layer are refused, not guessed.
    assert load_config(exp, ["runtime.memory_backend=eager"]).runtime.memory_backend == "eager"
    with pytest.raises(ConfigError, match="the command line: model.memory_compile=.*contradicts"):
        load_config(exp, ["runtime.memory_backend=eager", "model.memory_compile=true"])
    with pytest.raises(ConfigError, match=r"runtime.attn_backend='x': must be one of auto"):
        load_config(exp, ["model.attn_backend=x"])


def test_python_config_with_old_model_keys_moves_them_to_runtime():
    with pytest.warns(DeprecationWarning):
        cfg = Config(model=ModelConfig(attn_backend="sdpa"))
    assert cfg.runtime.attn_backend == "sdpa" and cfg.model.legacy_runtime == {}
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="runtime.attn_b"):
        Config(model=ModelConfig(attn_backend="sdpa"), runtime=RuntimeConfig(attn_backend="flex"))


def test_load_model_config_reads_old_keys(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("variant: mac\ndim: 64\nheads: 4\nattn_backend: sdpa\n")
    with pytest.warns(FutureWarning, match="model.attn_backend"):
        cfg = load_model_config(p, ["memory_compile=true"])
    assert TitansLM(cfg).runtime == RuntimeConfig("sdpa", "compile")
    with pytest.raises(ValueError, match="runtime.attn_backend"), pytest.warns(FutureWarning):
        load_model_config(p, ["attn_backend=cudnn"])


def test_upgrade_legacy_of_a_stored_config_is_silent():
    old = {"model": {"dim": 64, "attn_backend": "auto", "memory_compile": False}}
    old["zero"] = {"stage": 2, "activation_checkpointing": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = upgrade_legacy(old)
    assert new == {
        "model": {"dim": 64},
        "zero": {"stage": 2},
        "runtime": dict(
            attn_backend="auto", memory_backend="eager", activation_checkpointing=False
        ),
    }
    assert "attn_backend" in old["model"]  # the input is not changed


# -- resume: runtime changes are allowed, old checkpoints resume -------------------------------
def legacy_layout(tree: dict) -> dict:
    """A config as trainer_state.json held it before the runtime section (main at 73c44b5)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    rt = tree.pop("runtime")
    tree["model"].update(
        attn_backend=rt["attn_backend"],
        memory_compile=rt["memory_backend"] == "compile",
        memory_checkpoint_group=rt["memory_checkpoint_group"],
    )
    tree["zero"]["activation_checkpointing"] = rt["activation_checkpointing"]
    return tree


def test_resume_protects_the_maths_not_the_runtime_or_worker_count():
    from titans_train.checkpoint import config_diff
    from titans_train.config import DataConfig, public_dict

    saved = public_dict(Config(runtime=RuntimeConfig(memory_backend="eager")))
    now = Config(
        runtime=RuntimeConfig(attn_backend="sdpa", activation_checkpointing=True),
        data=DataConfig(num_workers=2),
    )
    protected, other = config_diff(upgrade_legacy(legacy_layout(saved)), public_dict(now))
    assert protected == []
    assert other == [
        "data.num_workers: 0 -> 2",
        "runtime.activation_checkpointing: False -> True",
        "runtime.attn_backend: 'auto' -> 'sdpa'",
        "runtime.cpu_threads: None -> 'auto'",  # a key added since: allowed
        "runtime.memory_backend: 'eager' -> 'auto'",
        "runtime.memory_checkpoint_budget_mb: None -> 256.0",  # a key added since: allowed
    ]
    now.model.dim, now.data.seed = 96, 1
    protected, _ = config_diff(upgrade_legacy(legacy_layout(saved)), public_dict(now))
    assert protected == ["data.seed: 0 -> 1", "model.dim: 768 -> 96"]


@pytest.mark.slow
def test_checkpoint_in_the_old_layout_resumes_without_force(demo_shards, tmp_path):
    """A checkpoint whose trainer_state.json has model.attn_backend, model.memory_compile, ...
    (as written before the runtime section) resumes, and may switch on activation checkpointing."""
    import json

    from trainer_helpers import losses, train_here

    from titans_train import checkpoint as ckpt

    run = tmp_path / "run"
    assert train_here(demo_shards, run, 2).returncode == 0  # in this process: trainer_helpers
    step = run / "checkpoints" / "step_00000002"
    state = json.loads((step / ckpt.STATE).read_text())
    state["config"] = legacy_layout(state["config"])
    assert state["config"]["model"]["memory_compile"] is False
    (step / ckpt.STATE).write_text(json.dumps(state, indent=1))
    marker = json.loads((step / ckpt.MARKER).read_text())  # re-commit the edited file
    marker["files"][ckpt.STATE] = (step / ckpt.STATE).stat().st_size
    if marker.get("digests"):
        marker["digests"][ckpt.STATE] = ckpt.file_digest(step / ckpt.STATE, marker["checksum"])
    (step / ckpt.MARKER).write_text(json.dumps(marker))

    proc = train_here(demo_shards, run, 3, "runtime.activation_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {step} at step 2" in proc.stderr
    assert "runtime.activation_checkpointing: False -> True" in proc.stderr
    assert sorted(losses(run)) == [1, 2, 3]
