"""Under torchrun: load each checkpoint into a DeepSpeed engine built from its stored config (the
trainer's own build_engine, same world size) and save the engine's logits on fixed tokens.

This is the reference an export must reproduce: the weights as DeepSpeed itself restores them,
gathered by its ZeRO-3 hooks, not a consolidated copy.
usage: checkpoint_logits.py OUT.pt STEP_DIR [STEP_DIR ...]
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from titans_train.checkpoint import load_trainer_state
from titans_train.config import Config
from titans_train.models import TitansLM


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    out, paths = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    tokens = torch.randint(0, 257, (2, 150), generator=torch.Generator().manual_seed(0))
    results = {}
    for path in paths:
        saved = load_trainer_state(path)["config"]
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))
        engine, _, _ = cfg.zero.build_engine(
            TitansLM(cfg.model), cfg.optim, cfg.train, dist.get_world_size()
        )
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        assert loaded is not None, path
        engine.eval()
        with torch.no_grad():
            results[str(path)] = engine(tokens).logits.float().cpu()
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": results}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
