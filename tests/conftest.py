import os

# Set before torch/deepspeed/wandb are imported by any test module.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """Demo shards (stdlib sources, byte tokenizer, T=128), built once per test session."""
    from trainer_helpers import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "shards", seq_len=128)
