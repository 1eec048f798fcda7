"""Under torchrun (2 ranks, gloo): one ZeRO-2 training step (2 micro-batches per rank) with loss
masks whose answer counts differ by micro-batch and rank, through ``Trainer.train_step`` and a
real DeepSpeed engine, against the plain module's step on the whole global batch at once.

The four micro-batches carry 1, 6, 0 and 3 answers. The step's loss and gradient must be the
mean over the 10 answers, whatever rank and micro-batch each fell on (and the empty one must
not make them NaN). SGD with lr 1 makes the parameter change the (clipped) gradient. Prints one
JSON line on rank 0.

``masked_step_parity.py B VARIANT [STAGE [KEY=VALUE ...]]``: with ``train.burn_in`` = B, the
same for the variant's model (ZeRO stage STAGE, default 2; model overrides KEY=VALUE); the
reference runs the first B tokens of the whole batch without gradient and trains the rest from
their state, and answers among the first B targets must not count. ``whole`` is the loss of the
whole rows in one call with those targets ignored (streaming equals one call). Rank 1's rows
start more documents than rank 0's, so the ranks' layouts differ.
"""

import copy
import json
import os
import sys
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist

from titans_train.data.loader import MicroBatch
from titans_train.models import ModelConfig, TitansLM
from titans_train.trainer import Trainer, same_graph_on_every_rank
from titans_train.validation import forward_rows, loss_targets

ROWS, T = 2, 17  # rows per micro-batch, tokens per row (16 targets)
ANSWERS = [[1, 6], [0, 3]]  # per rank, per micro-batch


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and loss masks [rank, micro-batch, row, T], the same on every rank."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (2, 2, ROWS, T), generator=g)
    masks = torch.zeros(2, 2, ROWS, T, dtype=torch.bool)
    for r, counts in enumerate(ANSWERS):
        for m, n in enumerate(counts):
            picked = torch.zeros(ROWS * (T - 1), dtype=torch.bool)
            picked[torch.randperm(picked.numel(), generator=g)[:n]] = True
            masks[r, m, :, 1:] = picked.view(ROWS, T - 1)  # targets: tokens 1..T-1
    return tokens, masks


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank = dist.get_rank()
    burn_in = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    variant = sys.argv[2] if len(sys.argv) > 2 else "transformer"
    stage = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.manual_seed(0)
    extra = dict(a.split("=", 1) for a in sys.argv[4:])  # e.g. mac_retrieval=memory_tokens
    cfg = ModelConfig(
        variant=variant, vocab_size=61, dim=32, depth=2, heads=4, window=6, segment_len=6,
        chunk_size=3, **extra,
    )  # fmt: skip
    model = TitansLM(cfg)
    ref = copy.deepcopy(model)
    if os.environ.get("PARITY_SHORTCUT") != "1":  # =1: as before the fix, to see it fail
        same_graph_on_every_rank(model, dist.get_world_size())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens, masks = global_batch()

    ds_config = {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,  # as the trainer's default; the reference clips alike
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    starts = torch.zeros(2, 2, ROWS, T, dtype=torch.bool)
    starts[..., 0] = True
    starts[1, 1, 0, 10] = True  # documents start after the burn-in on rank 1 only
    starts[1, 0, 1, [3, 14]] = True
    mbs = [
        MicroBatch(tokens[rank, m], starts[rank, m], torch.zeros(ROWS, 3), masks[rank, m])
        for m in (0, 1)
    ]
    result = Trainer.train_step(SimpleNamespace(engine=engine, burn_in=burn_in), mbs)

    flat = MicroBatch(tokens.flatten(0, 2), starts.flatten(0, 2), None, masks.flatten(0, 2))
    targets = loss_targets(flat, flat.tokens)
    with torch.no_grad():
        ignored = targets.index_fill(1, torch.arange(burn_in), -100)
        whole = ref(flat.tokens[:, :-1], targets=ignored, doc_starts=flat.doc_starts[:, :-1])
    want = forward_rows(ref, flat, burn_in).loss  # test_burn_in.py: equal to one call's
    want.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    # After SGD at lr 1 the change of each parameter is minus its clipped gradient.
    grad_diff, grad_max, worst, m0_grad = 0.0, 0.0, "", 0.0
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # ZeRO-3: whole
        for n, p in engine.module.named_parameters():
            step = before[n] - p.detach()
            grad = ref.get_parameter(n).grad
            d = (step - grad).abs().max().item()
            grad_max = max(grad_max, grad.abs().max().item())
            if "init_weights" in n:  # M_0: read after the burn-in by one document, on rank 1
                m0_grad = max(m0_grad, grad.abs().max().item())
            if d > grad_diff:
                grad_diff, worst = d, n
    if rank == 0:
        row = dict(
            loss=result.loss,
            want=want.item(),
            whole=whole.loss.item(),
            answers=int((targets[:, burn_in:] != -100).sum()),
            grad_diff=grad_diff,
            grad_max=grad_max,
            worst=worst,
            skipped=result.skipped,
            m0_grad=m0_grad,
        )
        print(json.dumps(row), flush=True)
    engine.destroy()
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
