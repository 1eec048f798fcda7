"""titans-train: pretraining Titans language models at scale."""

from titans_train import jit_build as _jit_build
from titans_train.distributed import default_ds_accelerator as _default_ds_accelerator

__version__ = "0.1.0"

# Before DeepSpeed can JIT-build anything: one extensions cache and one ninja per environment.
_jit_build.apply_defaults()
# Before anything imports DeepSpeed: its accelerator follows torch's device (silently).
_default_ds_accelerator()
