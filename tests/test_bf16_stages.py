"""bf16 training at ZeRO stages 0-3 on DeepSpeed's CPU accelerator (one process, gloo), with the
reduce dtypes engine.py sets: gradients accumulated in fp32 (stages 1-3; DeepSpeed refuses it at
stage 0) and communicated in fp32 (every stage). And the stage-0 export reads the fp32 master
weights, not the bf16 module."""

import pytest
import torch
from trainer_helpers import EXPERIMENT

from titans_train import checkpoint as ckpt
from titans_train.config import Config, to_dict
from titans_train.consolidate import load_checkpoint_model
from titans_train.engine import deepspeed_config
from titans_train.models import ModelConfig, TitansLM


def ds_config(cfg, world_size: int) -> dict:
    return deepspeed_config(cfg.zero, cfg.train, cfg.optim.grad_clip, world_size)


def bf16_config(stage: int) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        variant="mac",
        vocab_size=64,
        dim=32,
        depth=1,
        heads=2,
        window=8,
        segment_len=8,
        chunk_size=4,
        num_persistent=2,
    )
    cfg.zero.stage, cfg.zero.precision = stage, "bf16"
    cfg.train.seq_len, cfg.train.global_batch, cfg.train.micro_batch = 16, 2, 1  # 2 micro-batches
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.optim.lr = 3, 0, 1e-2
    return cfg


def train_steps(cfg: Config, steps: int = 2):
    torch.manual_seed(0)
    engine, _, _ = cfg.zero.build_engine(TitansLM(cfg.model), cfg.optim, cfg.train, 1)
    data = torch.randint(0, cfg.model.vocab_size, (steps, 2, 1, cfg.train.seq_len + 1))
    losses = []
    for step in data:
        for mb in step:
            loss = engine(mb[:, :-1], targets=mb[:, 1:]).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return engine, losses


def test_reduce_dtypes_in_the_deepspeed_config():
    cfg = bf16_config(2)
    ds = ds_config(cfg, 1)
    assert ds["communication_data_type"] == "fp32"
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    cfg.zero.grad_accum_dtype, cfg.zero.communication_dtype = "bf16", "bf16"
    ds = ds_config(cfg, 1)
    assert (
        ds["communication_data_type"] == "bf16" and ds["data_types"]["grad_accum_dtype"] == "bf16"
    )
    cfg.zero.stage = 0  # DeepSpeed 0.19.8: bf16 model + fp32 accumulation is refused at stage 0
    assert "data_types" not in ds_config(bf16_config(0), 1)
    cfg.zero.precision = "fp32"
    assert "communication_data_type" not in ds_config(cfg, 1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_trains_with_fp32_reduction(process_group, stage, tmp_path):
    cfg = bf16_config(stage)
    engine, losses = train_steps(cfg)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert engine.bfloat16_enabled()
    assert engine.communication_data_type == torch.float32
    model_dtype, accum_dtype = engine.get_data_types()
    assert model_dtype == torch.bfloat16
    assert accum_dtype == (torch.bfloat16 if stage == 0 else torch.float32)
    assert engine.global_steps == 2 and engine.skipped_steps == 0
    # Its checkpoint (stage 1 now writes BF16_Optimizer's files) consolidates to fp32.
    path = ckpt.save(engine, tmp_path, 2, {"step": 2, "config": to_dict(cfg)})
    model = load_checkpoint_model(path)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
    if stage < 3:  # the bf16 module is the masters rounded (stage 3: partitioned, not at hand)
        for name, p in engine.module.named_parameters():
            got = model.get_parameter(name)
            assert torch.allclose(got, p.float(), rtol=1e-2, atol=1e-3), name


def test_stage0_bf16_export_reads_the_fp32_masters(process_group, tmp_path):
    cfg = bf16_config(0)
    engine, _ = train_steps(cfg)
    path = ckpt.save(engine, tmp_path, 2, {"step": 2, "config": to_dict(cfg)})
    model = load_checkpoint_model(path)
    masters = torch.cat([p.detach().flatten() for g in engine.optimizer.fp32_groups for p in g])
    exported = dict(model.named_parameters())
    module = dict(engine.module.named_parameters())
    name = {id(p): n for n, p in module.items()}
    groups = engine.optimizer.fp16_groups  # the module's parameters, in the masters' layout
    flat = torch.cat([exported[name[id(p)]].detach().flatten() for g in groups for p in g])
    assert torch.equal(flat, masters)
    rounded = [n for n, p in exported.items() if not torch.equal(p, module[n].float())]
    assert rounded, "the export equals the bf16 module: the masters were not read"


@pytest.mark.parametrize(
    "override,key",
    [
        ("zero.grad_accum_dtype=fp16", "zero.grad_accum_dtype: 'fp16' is not fp32 or bf16"),
        ("zero.communication_dtype=float32", "zero.communication_dtype: 'float32' is not"),
        ("train.tf32=maybe", "train.tf32"),
    ],
)
def test_bad_precision_keys_are_config_errors(override, key):
    from titans_train.config import ConfigError
    from titans_train.config_load import load_config

    with pytest.raises(ConfigError, match=key):
        load_config(EXPERIMENT, [override])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_stage1_bf16_export(demo_shards, tmp_path):
    """BF16_Optimizer's partitions of two ranks merge into the whole model: each weight is the
    bf16 module's within bf16 rounding (a misplaced fragment would be off by the weight itself)."""
    from trainer_helpers import train

    train(demo_shards, tmp_path, 2, "zero.stage=1", "zero.precision=bf16", nproc=2)
    path = ckpt.find_latest(tmp_path / "checkpoints")
    assert len(list(path.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    model = load_checkpoint_model(path)
    module = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name, p in model.state_dict().items():
        assert torch.allclose(p, module[name].float(), rtol=2**-7, atol=1e-3), name
