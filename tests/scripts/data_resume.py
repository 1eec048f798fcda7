"""Run by tests/test_data_resume.py under torchrun: 2 ranks on gloo, one JSON of results per rank.

Scenarios: exact resume with num_workers 0 and 2; the first steps of an epoch (resumed on one
rank by the test); the rest of an epoch resumed from a one-rank state; uneven shards with an
all-reduce every step, as DDP would do (a rank with fewer steps would hang here, and the
gloo timeout turns that hang into a failure).
"""

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from data_helpers import step_hashes  # tests/ is on PYTHONPATH (see test_data_resume.py)

from titans_train.data import StreamingLoader

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--uneven", required=True)
parser.add_argument("--state-in", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
kw = dict(
    seq_len=31, vocab_size=257, micro_batch=2, rank=rank, world_size=world, seed=7, interleave=4
)
results = {}

for nw in (0, 2):
    full = StreamingLoader(args.data, global_batch=12, num_workers=nw, **kw)
    seq, state = [], None
    for i in range(16):  # 16 x 12 > 104: crosses into epoch 1 inside a step
        if i == 9:
            state = full.state_dict()
        seq.append(step_hashes(full.next_step()))
    again = StreamingLoader(args.data, global_batch=12, num_workers=nw, **kw)
    again.load_state_dict(json.loads(json.dumps(state)))  # as through a checkpoint file
    results[f"nw{nw}"] = {
        "full": seq,
        "resumed": [step_hashes(again.next_step()) for _ in range(7)],
    }
    full.close()
    again.close()

head = StreamingLoader(args.data, global_batch=8, max_epochs=1, **kw)
results["head"] = [step_hashes(head.next_step()) for _ in range(5)]
results["head_state"] = head.state_dict()

with open(args.state_in, encoding="utf-8") as f:
    tail = StreamingLoader(args.data, global_batch=8, max_epochs=1, **kw)
    tail.load_state_dict(json.load(f))
results["tail"] = [step_hashes(step) for step in tail]

uneven = StreamingLoader(args.uneven, global_batch=4, max_epochs=1, num_workers=2, **kw)
rows, steps = [], 0
for step in uneven:
    rows += step_hashes(step)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # every rank must reach this the same number of times
    steps += 1
counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
dist.all_gather(counts, torch.tensor([steps]))
results["uneven"] = {"rows": rows, "steps": [int(c) for c in counts]}

with open(os.path.join(args.out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f)
dist.destroy_process_group()
