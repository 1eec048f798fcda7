"""The GPU path's device and backend choices, held on CPU.

- Collectives: the trainer's host-side collectives (preemption flags, the logged loss, the
  validation totals, barriers) hold CPU tensors. NCCL serves CUDA tensors only, and so does a
  ``"cuda:gloo"`` group, which is how a GPU's group is emulated here: the backend the trainer
  builds for CUDA, with gloo standing in for NCCL, must run every one of them.
- One source of truth: the device, the backend, bf16, fused AdamW and the MFU/memory probes
  follow DeepSpeed's accelerator, so ``DS_ACCELERATOR=cpu`` means CPU even when torch sees CUDA.
"""

import datetime
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from trainer_helpers import EXPERIMENT, base_overrides

from titans_train import distributed, engine, metrics
from titans_train.config import Config
from titans_train.config_load import load_config
from titans_train.models import TitansLM
from titans_train.preemption import Preemption
from titans_train.validation import all_mean, validation_loss


def emulated(backend: str) -> str:
    """A backend spec as it would serve a GPU, with gloo standing in for NCCL: a bare "nccl"
    serves CUDA only (what torch gives it), "cpu:gloo,cuda:nccl" both."""
    if ":" not in backend:
        return "cuda:gloo" if backend == "nccl" else backend
    return backend.replace(":nccl", ":gloo")


@pytest.fixture
def group(tmp_path):
    """A 1-process group built from a backend spec; destroyed afterwards."""
    made = []

    def make(backend: str):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group(
            backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
        )
        made.append(backend)

    yield make
    if made and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def preemption():
    """A Preemption as the trainer installs it; the test process's signal handlers restored."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield Preemption(rank=0)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run_trainer_collectives(cfg: Config, preemption: Preemption) -> None:
    """Every collective train.py issues itself, with the tensors it builds."""
    assert preemption.should_stop() is None
    preemption._handle(signal.SIGUSR1, None)
    assert preemption.should_stop() == "SIGUSR1"
    assert all_mean([torch.tensor(1.0), torch.tensor(3.0)]) == 2.0
    assert distributed.max_over_ranks(3) == 3  # MAC's agreed documents grid (TitansLM.layout_agree)
    model = TitansLM(cfg.model)  # what the engine wraps; validation only calls it
    with cfg.data.build_val_loader(cfg.train, cfg.model.vocab_size, 0, 1) as batches:
        val = validation_loss(model, batches, cfg.train.eval_batches)
    assert val["val/loss"] > 0
    dist.barrier()  # checkpoint.py's barriers and object collectives pick the CPU backend
    gathered = [None]
    dist.all_gather_object(gathered, {"step": 1})
    assert gathered == [{"step": 1}]


@pytest.fixture
def tiny_cfg(demo_shards, tmp_path):
    overrides = base_overrides(demo_shards / "manifest.json", tmp_path / "run", 1)
    overrides += ["train.eval_batches=1", "model.depth=1", "model.dim=32", "model.heads=2"]
    return load_config(EXPERIMENT, overrides)


def test_trainer_collectives_run_in_the_gpu_group(group, preemption, tiny_cfg):
    backend = distributed.process_group_backend("cuda", "nccl")
    group(emulated(backend))
    run_trainer_collectives(tiny_cfg, preemption)


def test_a_cuda_only_group_refuses_them(group, preemption):
    """The emulation is faithful: plain NCCL's device map (what main chose) refuses CPU tensors
    with the error a GPU run gets at step 1."""
    group(emulated("nccl"))
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        preemption.should_stop()


@pytest.fixture
def cuda_claimed(monkeypatch):
    """torch claims a GPU (as on a GPU host) while DS_ACCELERATOR=cpu (set by conftest)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_ds_accelerator_cpu_means_cpu(cuda_claimed):
    assert distributed.device_type() == "cpu"
    assert distributed.device() == torch.device("cpu")
    acc = distributed.accelerator()
    backend = distributed.process_group_backend(acc.device_name(), acc.communication_backend_name())
    assert backend == "gloo"
    cfg = Config()
    assert not engine.use_bf16(cfg.zero)  # precision "auto"
    cfg.zero.stage = 0
    opt = engine.build_optimizer(cfg.optim, torch.nn.Linear(2, 2))
    assert not opt.defaults["fused"]
    assert metrics.peak_memory_gb() > 0  # resident set size, not torch.cuda.max_memory_allocated


def test_unset_ds_accelerator_follows_torch(cuda_claimed, monkeypatch):
    """`make train` no longer exports DS_ACCELERATOR=cpu: unset, it follows torch's device (as
    DeepSpeed's own detection would, without its warning on stdout); set, it is kept."""
    assert distributed.default_ds_accelerator({}) == "cuda"
    assert distributed.default_ds_accelerator({"DS_ACCELERATOR": "cpu"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env: dict[str, str] = {}
    assert distributed.default_ds_accelerator(env) == "cpu" and env == {"DS_ACCELERATOR": "cpu"}


def test_tools_keep_stdout_for_their_output(tmp_path):
    """DeepSpeed's accelerator detection once printed a warning on stdout, ahead of the text
    titans-generate prints, whenever DS_ACCELERATOR was unset."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = "import titans_train, deepspeed.accelerator as a; a.get_accelerator()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "", out.stdout


def test_init_distributed_follows_the_accelerator(cuda_claimed, monkeypatch, tmp_path):
    """The old init_distributed asked torch.cuda and called set_device on a CPU accelerator."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    try:
        distributed.init_distributed(startup_timeout=60)
        assert dist.get_backend() == "gloo"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "device_type,comm,expected",
    [("cuda", "nccl", "cpu:gloo,cuda:nccl"), ("cpu", "gloo", "gloo"), ("cpu", "ccl", "ccl")],
)
def test_process_group_backend(device_type, comm, expected):
    assert distributed.process_group_backend(device_type, comm) == expected


def test_tf32_switch(monkeypatch):
    """On CUDA train.tf32 sets the flag, and torch's legacy getters (inductor reads them) keep
    working; on the CPU accelerator it changes nothing."""
    distributed.set_tf32(True)
    assert not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(distributed, "device_type", lambda: "cuda")
    try:
        distributed.set_tf32(True)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        distributed.set_tf32(False)
    assert torch.get_float32_matmul_precision() == "highest"
