"""Titans language models: plain nn.Modules that know nothing about ranks, DeepSpeed or files.

``ModelConfig`` says what a model computes, ``RuntimeConfig`` how it runs (backends,
checkpointing). Reading and writing models is ``titans_train.pretrained``.
"""

from .blocks import BlockState
from .config import ModelConfig
from .lm import LMOutput, LMState, TitansLM, sample_next
from .memory import MemoryState, NeuralMemory
from .runtime import RuntimeConfig, apply_activation_checkpointing

__all__ = [
    "BlockState",
    "LMOutput",
    "LMState",
    "MemoryState",
    "ModelConfig",
    "NeuralMemory",
    "RuntimeConfig",
    "TitansLM",
    "apply_activation_checkpointing",
    "sample_next",
]
