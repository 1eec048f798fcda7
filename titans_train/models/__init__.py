"""Titans language models: plain nn.Modules that know nothing about ranks, DeepSpeed or files."""

from .config import ModelConfig, load_model_config
from .memory import MemoryState, NeuralMemory

__all__ = ["MemoryState", "ModelConfig", "NeuralMemory", "load_model_config"]
