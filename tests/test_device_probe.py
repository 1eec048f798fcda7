"""The GPU's device contract, held on CPU: no op mixes devices.

Every variant runs forward, backward, streaming (state carried) and ``generate`` on the "meta"
device, and so do the perplexity and recall evaluators, under a dispatch mode that rejects any op
whose tensor operands sit on different devices. A tensor created off the model's device (a CPU
``torch.zeros`` in a GPU run) trips it here instead of on the first GPU run. The dispatch mode is
needed because meta kernels accept mixed operands (``meta += cpu`` runs).
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from titans_train.models import ModelConfig, RuntimeConfig, TitansLM
from titans_train.perplexity import perplexity
from titans_train.recall import recall_suite

VARIANTS = [("mac", "per_token"), ("mac", "memory_tokens"), ("mag", None), ("mal", None)]
VARIANTS += [("lmm", None), ("transformer", None)]
IDS = [v if m is None else f"{v}-{m}" for v, m in VARIANTS]


class MixedDevices(TorchDispatchMode):
    """Raises on an op whose tensor arguments are on more than one device. 0-dim CPU tensors are
    allowed: torch treats them as scalars on any device (a Python number becomes one).

    A meta tensor has no value, so reading one on the host (``.item()``, ``bool(t.all())``: the
    attention's empty-row check, the evaluators' sums) answers 0 / False: the probe is about
    where tensors live, and either branch after such a read runs on the same devices.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise AssertionError(f"{func}: operands on {sorted(map(str, devices))}")
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **kwargs)


def tiny(variant: str, mode: str | None, **extra) -> TitansLM:
    cfg = ModelConfig(
        variant=variant,
        vocab_size=61,
        dim=32,
        depth=1,  # what one block does, every block does; the state crosses calls below
        heads=4,
        window=6,
        segment_len=8,
        chunk_size=4,
        num_persistent=2,
        num_memory_tokens=3,
        mac_retrieval=mode or "per_token",
        **extra,
    )
    return TitansLM(cfg, RuntimeConfig(memory_checkpoint_group=0)).to("meta")


def test_probe_catches_a_cpu_operand():
    """The probe can fail: an in-place add of a CPU tensor into a meta one passes without it."""
    x = torch.zeros(3, device="meta")
    x += torch.ones(3)  # meta kernels accept it
    with pytest.raises(AssertionError, match="operands on"), MixedDevices():
        x += torch.ones(3)


@pytest.mark.parametrize("variant,mode", VARIANTS, ids=IDS)
def test_model_stays_on_its_device(variant, mode):
    model = tiny(variant, mode)
    tokens = torch.randint(0, 61, (2, 14)).to("meta")
    with MixedDevices():
        out = model(tokens, targets=tokens)
        out.loss.backward()
        with torch.no_grad():
            first = model(tokens[:, :5])
            model(tokens[:, 5:], state=first.state)  # streaming: the state carried
            model.generate(tokens[0, :5], 2, temperature=0)
            model.generate(tokens[:, :5], 2, temperature=0, use_cache=False)


def test_token_conv_stays_on_its_device():
    """model.token_conv: its carried tail and, called directly (on meta, bool(any) answers False,
    so the model would take the one-document path), its document masks."""
    model = tiny("transformer", None, token_conv=4)
    tokens = torch.randint(0, 61, (2, 14)).to("meta")
    starts = torch.zeros(2, 14, dtype=torch.bool)
    starts[:, 6] = True
    with MixedDevices():
        model(tokens, targets=tokens).loss.backward()
        with torch.no_grad():
            first = model(tokens[:, :5])
            model(tokens[:, 5:], state=first.state)
            model.generate(tokens[0, :5], 2, temperature=0)
            x = model.embed(tokens)
            _, tail = model.token_conv(x[:, :9], None, starts[:, :9].to("meta"))
            model.token_conv(x[:, 9:], tail, starts[:, 9:].to("meta"))


def test_evaluators_follow_the_model():
    """perplexity and recall get CPU data (numpy streams, token lists) and must move it."""
    model = tiny("mac", "per_token").eval()
    stream = np.arange(200, dtype=np.int64) % 61
    with MixedDevices(), torch.no_grad():
        ppl = perplexity(model, stream, [16], 32, piece=8, batch_size=2)
        recall = recall_suite(model, "passkey", [128], lambda s: [ord(c) % 61 for c in s], 2, 64)
    assert ppl[16]["windows"] == 2 and recall[128]["examples"] == 2
