"""Under torchrun (2 ranks, gloo): a ZeRO-3 forward+backward of each variant vs the plain module.

Prints one JSON line per variant on rank 0 with the max loss / gradient differences.
"""

import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from titans_train.models import ModelConfig, TitansLM

VARIANTS = sys.argv[1].split(",")


def tiny(variant: str) -> ModelConfig:
    v, _, mode = variant.partition(":")
    return ModelConfig(
        variant=v,
        vocab_size=53,
        dim=32,
        depth=2,
        heads=4,
        window=6,
        segment_len=8,
        chunk_size=4,
        num_persistent=3,
        num_memory_tokens=3,
        mac_retrieval=mode or "per_token",
    )


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {
            "stage": 3,
            # Partition every parameter, however small, so the test exercises the gather hooks.
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "steps_per_print": 10**9,
    }
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = TitansLM(tiny(variant))
        ref = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 53, (2 * world, 21), generator=g)
        mine = tokens[2 * rank : 2 * rank + 2]

        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        loss = engine(mine[:, :-1], targets=mine[:, 1:]).loss
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())

        ref_out = ref(tokens[:, :-1], targets=tokens[:, 1:])
        ref_out.loss.backward()
        # The engine averages gradients over ranks; the plain run sees the whole global batch.
        loss_diff = abs(torch.stack(losses).mean().item() - ref_out.loss.item())
        grad_diff, worst = 0.0, ""
        for n, p in ref.named_parameters():
            d = (grads[n] - p.grad).abs().max().item()
            if d > grad_diff:
                grad_diff, worst = d, n
        if rank == 0:
            print(
                json.dumps(
                    dict(
                        variant=variant,
                        loss_diff=loss_diff,
                        grad_diff=grad_diff,
                        worst=worst,
                        n_params=len(grads),
                    )
                ),
                flush=True,
            )
        engine.destroy()
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
