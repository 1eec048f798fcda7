"""What DeepSpeed holds per rank, by kind: the tensor accounting of bench_trainer.py's memory
benchmark (params, grads, fp32 master copy, optimizer state, gradient reduction buffers).

Tensors are found from the model's parameters (.data, .ds_tensor, .grad) and by walking the
ZeRO optimizer object (attributes, lists, dicts, the inner torch optimizer's state). Each storage
counts once, however many views of it there are, so flat buffers are not double counted.
"""

from __future__ import annotations

import gc
import re


def tensors_under(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """(path, tensor) for every tensor reachable from a DeepSpeed/torch optimizer object through
    attributes, lists and dicts. Other objects (modules, process groups) are not entered."""
    import torch

    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        return
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [
            (f"[{k!r}]" if not isinstance(k, torch.Tensor) else "[param]", v)
            for k, v in obj.items()
        ]
    elif isinstance(obj, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(obj)]
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
        if isinstance(obj, torch.nn.Module):
            return  # the engine and model: their parameters are counted directly
        items = [(f".{k}", v) for k, v in vars(obj).items()]
        if isinstance(obj, torch.optim.Optimizer):
            items.append((".state", dict(obj.state)))
    else:
        return
    for name, value in items:
        tensors_under(value, path + name, out, seen, depth + 1)


# A storage reached by several paths (a param is a view into a flat buffer, a grad a view into
# the reduce bucket) takes the first of these that any of its paths gets.
PRECEDENCE = ("reduce_buffers", "params", "grads", "fp32_master", "optimizer_state", "other")


def category(path: str) -> str:
    """Which bucket a tensor goes in, from where DeepSpeed or the model keeps it."""
    p = path.lower()
    if ("ipg" in p or "bucket" in p) and "buffer" in p:  # not the bucket's list of params
        return "reduce_buffers"  # DeepSpeed's gradient reduction staging (reduce_bucket_size)
    if p.startswith("param."):  # p.data, p.ds_tensor (this rank's ZeRO-3 partition), p.grad
        return "grads" if p.startswith("param.grad.") else "params"
    if "grad" in p:
        return "grads"  # averaged_gradients, grads_in_partition, fp32 partitions' .grad, ...
    if "fp32" in p:
        return "fp32_master"  # ZeRO's fp32 copy of this rank's partition, kept even in fp32
    if ".state[" in p:
        return "optimizer_state"  # AdamW exp_avg, exp_avg_sq, step
    if "bit16" in p or "fp16" in p:
        return "params"  # DeepSpeed's flat buffers behind the model's parameters
    return "other"


def short_path(path: str) -> str:
    """'param.grad.blocks.0.attn.qkv.weight' -> 'param.grad'; list indices dropped."""
    if path.startswith("param."):
        kind = path.split(".")[1]
        return f"param.{kind if kind in ('grad', 'ds_tensor') else 'data'}"
    return re.sub(r"\[\d+\]", "", path)


def held_bytes(engine, model) -> dict:
    """Bytes per category of unique storages (views into DeepSpeed's flat buffers count once)."""
    import torch

    found = []
    for name, p in model.named_parameters():
        found.append(("param." + name, p.data))
        if getattr(p, "ds_tensor", None) is not None:  # ZeRO-3: this rank's partition
            found.append(("param.ds_tensor." + name, p.ds_tensor))
        if p.grad is not None:
            found.append(("param.grad." + name, p.grad))
    tensors_under(engine.optimizer, "optimizer", found, set())
    storages: dict[int, tuple[int, set]] = {}
    for path, t in found:
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            key = t.untyped_storage().data_ptr()
            storages.setdefault(key, (t.untyped_storage().nbytes(), set()))[1].add(path)
    sizes: dict[str, int] = {}
    where: dict[str, set] = {}
    for nbytes, path_set in storages.values():
        cat = min((category(x) for x in path_set), key=PRECEDENCE.index)
        sizes[cat] = sizes.get(cat, 0) + nbytes
        where.setdefault(cat, set()).update(map(short_path, path_set))
    every = {}  # cross-check: every live tensor in the process, deduplicated the same way
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type != "meta":
            every[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return dict(
        bytes=sizes,
        all_live_tensors=sum(every.values()),
        where={k: sorted(v)[:8] for k, v in where.items()},
    )
