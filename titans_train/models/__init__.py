"""Titans language models: plain nn.Modules that know nothing about ranks, DeepSpeed or files."""

from .blocks import BlockState
from .config import ModelConfig, load_model_config
from .lm import LMOutput, LMState, TitansLM, sample_next
from .memory import MemoryState, NeuralMemory

__all__ = [
    "BlockState",
    "LMOutput",
    "LMState",
    "MemoryState",
    "ModelConfig",
    "NeuralMemory",
    "TitansLM",
    "load_model_config",
    "sample_next",
]
