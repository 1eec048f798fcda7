"""bf16 models on ``memory_backend: triton`` (issue 14), in Triton's interpreter.

The memory runs its inner loop in fp32 whatever the model's dtype: ``NeuralMemory`` upcasts q, k,
v, the gates and M_0 (``memory_state.upcast``) before ``memory_scan``, and q, k are l2-normalised
after the upcast, so they are not bf16 values. The kernel is therefore handed fp32 in both bf16
set-ups (bf16 parameters; fp32 parameters under bf16 autocast) and keeps fp32 state, exactly as
the eager path does; docs/memory.md ("bf16 inputs") says why loading bf16 in the kernel would not
pay."""

import pytest
import torch
from test_memory_triton import (  # noqa: F401 (interpreter: the autouse fixture)
    interpreter,
    kernel,
    lm_cfg,
    make_inputs,
)

from titans_train.models import RuntimeConfig, TitansLM
from titans_train.models.memory_math import span_coeffs

# bf16 keeps 8 significant bits: fp32 noise between the two paths (the kernel's and eager's sum
# orders) can flip a rounding to bf16 where the memory's reads, and later the gradients, return
# to bf16, which moves a value by one unit in the last place: 2^(e-7) for a value in
# [2^e, 2^(e+1)), at most 2^-7 of it. (Seen: a gate bias's gradient 2 of 6 entries one ulp
# apart, 5.4e-3 of its norm.)
BF16_ULP = 2.0**-7


def run(backend: str, mode: str, dtypes: list | None = None, monkeypatch=None):
    """Loss and parameter gradients of a tiny LMM (2 layers, head dim 16, chunk 8, a partial
    last chunk, checkpoint groups of 2) in bf16: ``params`` casts the model to bf16, ``autocast``
    keeps fp32 parameters under CPU bf16 autocast. ``dtypes`` collects the dtypes the kernel is
    handed (every launch, the backward's rebuild included)."""
    if dtypes is not None:
        mod = kernel()
        real = mod.scan_chunks_triton

        def spy(weights, momentum, k, v, q, coeffs, *args, **kw):
            given = [*weights, *momentum, k, v, *coeffs] + ([] if q is None else [q])
            dtypes.append({t.dtype for t in given})
            return real(weights, momentum, k, v, q, coeffs, *args, **kw)

        monkeypatch.setattr(mod, "scan_chunks_triton", spy)
    torch.manual_seed(0)
    runtime = RuntimeConfig(memory_backend=backend, memory_checkpoint_group=2)
    model = TitansLM(lm_cfg(variant="lmm"), runtime)
    if mode == "params":
        model = model.to(torch.bfloat16)
    x = torch.randint(0, 61, (2, 36), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = model(x, targets=x)
        assert out.logits.dtype == torch.bfloat16  # the model does run in bf16
        out.loss.backward()
    grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
    return out.loss.detach().float(), grads


@pytest.mark.parametrize("mode", ["params", "autocast"])
def test_bf16_model_trains_on_the_kernel_in_fp32(mode, monkeypatch):
    """A bf16 model (bf16 parameters, or fp32 ones under autocast) trains on the kernel: every
    launch is handed fp32 (state, k, v, q, coefficients), and loss and every gradient equal eager's
    to one bf16 ulp (``BF16_ULP``, relative; the gradients norm-wise)."""
    dtypes = []
    loss, grads = run("triton", mode, dtypes, monkeypatch)
    assert len(dtypes) == 4  # 2 layers x (forward + the backward's rebuild), 1 group each
    assert all(d == {torch.float32} for d in dtypes), dtypes
    loss0, grads0 = run("eager", mode)
    assert torch.isfinite(loss) and abs(loss - loss0) <= BF16_ULP * abs(loss0)
    assert len(grads) == len(grads0)
    for g, g0 in zip(grads, grads0):
        assert torch.isfinite(g).all()
        assert (g - g0).norm() <= BF16_ULP * g0.norm().clamp_min(1e-6)


def test_kernel_refuses_bf16_inputs_naming_the_key():
    """The kernel itself takes fp32 or fp64 (the memory upcasts before it): bf16 k is refused
    with an error naming the setting and the dtype, not run at a precision eager does not use."""
    W, S, k, v, q, theta, log_eta, log_keep = make_inputs(N=16, dt=torch.float32)
    co = span_coeffs(theta, log_eta, log_keep, 8)
    bf = [t.bfloat16() for t in (k, v, q)]
    with pytest.raises(ValueError, match=r"memory_backend='triton'.*dtype torch.bfloat16"):
        kernel().scan_chunks_triton(W, S, *bf, co, 8, True)
