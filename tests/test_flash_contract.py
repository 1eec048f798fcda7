"""The flash-attn adapter against an independent contract model of flash-attn (CPU, bf16).

The contract model (titans_train/testing/flash_contract.py) is written from flash-attn's sources,
not from this project's mask or band kernels, so a misunderstanding the adapter and our own
kernels share is caught here. The mutation test proves the comparison can fail.
"""

import functools
import logging
import sys
import types

import doc_helpers
import pytest
import torch

from titans_train.models.attention import (
    Causal,
    KeyGroup,
    Visible,
    attend,
    attention_backend_report,
    documents,
)
from titans_train.models.attention import flash as attention_flash
from titans_train.models.attention.flash import make_flash_kernel, reset_flash_import
from titans_train.testing.flash_contract import (
    contract_forward,
    flash_attn_module,
    installed,
    visible_keys,
)
from titans_train.testing.flash_contract_varlen import contract_varlen_forward

B, H, D = 2, 2, 16
VERSIONS = ["2.6.0", "2.8.3"]

# Every attention pattern the models use: name -> (queries, [(rule, keys), ...]).
PATTERNS = {
    "window": (13, [(Causal(0, 0, window=4), 13)]),
    "window_persistent_cache": (5, [(Visible(), 3), (Causal(8, 5, window=4), 8)]),
    "full_causal": (13, [(Causal(0, 0), 13)]),
    "mac_segment": (13, [(Visible(), 3), (Causal(0, 0, segment=5), 13),
                         (Causal(0, 0, segment=5), 13)]),
    "mac_second_segment": (5, [(Visible(), 3), (Causal(5, 5, segment=5), 5),
                               (Causal(5, 5, segment=5), 5)]),
    "mac_memory_tokens": (13, [(Visible(), 3), (Visible(), 4), (Causal(0, 0, segment=5), 13)]),
    "one_query_many_keys": (1, [(Visible(), 2), (Causal(12, 0, window=5), 13)]),
    "one_query_full_cache": (1, [(Causal(20, 0), 21)]),
}  # fmt: skip


def make(name, dtype, seed=0):
    n_q, spec = PATTERNS[name]
    gen = torch.Generator().manual_seed(seed)

    def rnd(n):
        return torch.randn(B, H, n, D, generator=gen).to(dtype).requires_grad_()

    q, q_nope = rnd(n_q), rnd(n_q)
    return q, q_nope, [KeyGroup(rnd(s), rnd(s), rule) for rule, s in spec]


def run(backend, q, q_nope, groups):
    out = attend(q, groups, q_nope=q_nope, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    leaves = [q, q_nope, *(t for g in groups for t in (g.k, g.v))]
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def upcast(q, q_nope, groups):
    f = lambda x: x.detach().double().requires_grad_()  # noqa: E731
    return f(q), f(q_nope), [KeyGroup(f(g.k), f(g.v), g.rule) for g in groups]


def check_against_sdpa(name, module):
    """flash (through the adapter, on `module`) in bf16 vs SDPA in fp64 on the same values."""
    q, q_nope, groups = make(name, torch.bfloat16)
    with installed(module):
        out, grads = run("flash", q, q_nope, groups)
    ref, ref_grads = run("sdpa", *upcast(q, q_nope, groups))
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_adapter_matches_contract_forward_and_grads(name, version):
    check_against_sdpa(name, flash_attn_module(version))


@pytest.mark.parametrize("name", ["window_persistent_cache", "one_query_many_keys"])
def test_mutation_top_left_alignment_is_caught(name):
    """Self-test: against a flash that aligned masks top-left, the same check must fail."""
    with pytest.raises(AssertionError):
        check_against_sdpa(name, flash_attn_module("2.8.3", top_left=True))


@pytest.mark.parametrize("version", VERSIONS)
def test_adapter_maps_flash_empty_rows_to_minus_inf(version):
    """flash-attn reports a row with no key as lse = +inf; the merge protocol wants -inf."""
    api = flash_attn_module(version).flash_attn_interface
    kernel = make_flash_kernel(api._flash_attn_forward, api._flash_attn_backward)
    q, k = torch.randn(B, H, 5, D).bfloat16(), torch.randn(B, H, 2, D).bfloat16()
    out, lse = kernel.forward(q, k, k, -1, 0, D**-0.5)  # rows 0-2 see no key
    assert bool((lse[..., :3] == float("-inf")).all()) and bool(torch.isfinite(lse[..., 3:]).all())
    assert bool((out[:, :, :3] == 0).all())


# ---- the contract model itself, against flash-attn's documented examples ----


def test_contract_masks_are_flash_attn_docstring_examples():
    # flash_attn_func docstring: causal, seqlen_q=2, seqlen_k=5 and seqlen_q=5, seqlen_k=2.
    assert visible_keys(2, 5, -1, 0).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible_keys(5, 2, -1, 0).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert visible_keys(2, 5, -1, 0, top_left=True).int().tolist() != [[1, 1, 1, 1, 0]] * 2


def test_contract_empty_rows_lse_plus_inf_and_window_normalisation():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 8, generator=gen).bfloat16() for n in (5, 2, 2))
    out, lse = contract_forward(q, k, v, 8**-0.5, -1, 0, causal=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 1, 5)
    assert bool((lse[..., :3] == float("inf")).all()) and bool((out[:, :3] == 0).all())
    q, k, v = (torch.randn(1, n, 1, 8, generator=gen).bfloat16() for n in (4, 6, 6))
    full = contract_forward(q, k, v, 0.3, -1, 0, causal=False)
    for left in (6, 999):  # left >= seqlen_k means unbounded
        torch.testing.assert_close(contract_forward(q, k, v, 0.3, left, 0, False), full)


@pytest.mark.parametrize("version", VERSIONS)
def test_contract_rejects_what_flash_rejects(version):
    fwd = flash_attn_module(version).flash_attn_interface._flash_attn_forward
    window = {"window_size": (-1, 0)} if version == "2.6.0" else {
        "window_size_left": -1, "window_size_right": 0}  # fmt: skip

    def call(q, k=None):
        k = q if k is None else k
        return fwd(q, k, k, dropout_p=0.0, softmax_scale=1.0, causal=False, softcap=0.0,
                   alibi_slopes=None, return_softmax=False, **window)  # fmt: skip

    x = torch.randn(1, 3, 2, 16)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        call(x)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        call(torch.randn(1, 3, 2, 16 * 2).bfloat16()[..., ::2])
    with pytest.raises(RuntimeError, match="multiple of 8"):
        call(torch.randn(1, 3, 2, 12).bfloat16())
    with pytest.raises(RuntimeError, match="at most 256"):
        call(torch.randn(1, 3, 2, 264).bfloat16())
    with pytest.raises(RuntimeError, match="same dtype"):
        call(x.bfloat16(), x.half())


def test_public_flash_attn_func_pads_head_dim_and_ignores_lse_grad():
    mod = flash_attn_module()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 12, generator=gen, dtype=torch.float64) for n in (3, 7, 7))
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k, v))
    out, lse, _ = mod.flash_attn_func(qb, kb, vb, causal=True, return_attn_probs=True)
    assert out.shape == (1, 3, 2, 12) and lse.shape == (1, 2, 3) and not lse.requires_grad
    s = torch.einsum("bihd,bjhd->bhij", *(x.detach().double() for x in (qb, kb))) / 12**0.5
    s = s.masked_fill(~visible_keys(3, 7, -1, 0), float("-inf"))  # bottom-right causal
    ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vb.detach().double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in (qb, kb, vb))


# ---- backend selection and the backend report ----


def test_auto_picks_flash_only_on_sm80_or_newer(monkeypatch):
    cuda = torch.device("cuda")
    with installed(flash_attn_module()):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        old = attention_backend_report(cuda, torch.bfloat16, "auto", head_dim=64)
        assert old["backend"] != "flash" and "sm75" in old["flash_reason"]
        forced = attention_backend_report(cuda, torch.bfloat16, "flash", head_dim=64)
        assert forced["backend"] is None and "sm80" in forced["error"]
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        new = attention_backend_report(cuda, torch.bfloat16, "auto", head_dim=64)
        assert new["backend"] == "flash" and new["flash_reason"] is None
        assert new["flash_version"] == "2.8.3" and new["flash_signature"] == "window_size_left"


class _BrokenFlash(types.ModuleType):
    def __getattr__(self, name):  # what a flash-attn built for another torch/CUDA does
        raise OSError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")


def test_broken_flash_import_is_logged_with_its_reason(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", _BrokenFlash("x"))
    reset_flash_import()
    try:
        with caplog.at_level(logging.WARNING, logger=attention_flash.__name__):
            report = attention_backend_report("cpu", torch.bfloat16)
        assert "undefined symbol" in caplog.text and "OSError" in report["flash_import_error"]
        assert report["backend"] == "sdpa" and not report["flash_available"]
        assert report["flash_version"] is None
    finally:
        monkeypatch.undo()
        reset_flash_import()


def _fa3_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                 cu_seqlens_k=None, softmax_scale=None, causal=False, window_size_left=-1,
                 window_size_right=-1, attention_chunk=0, softcap=0.0):  # fmt: skip
    raise AssertionError("FA3 must never be called")


def _fa3_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None,
                  sequed_q=None, sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None,
                  dk=None, dv=None, softmax_scale=None, is_causal=False, window_size_left=-1,
                  window_size_right=-1, softcap=0.0, deterministic=False):  # fmt: skip
    raise AssertionError("FA3 must never be called")


def test_fa3_signature_is_refused_never_called(monkeypatch):
    """hopper/flash_attn_interface.py's private functions (FA3) take no dropout_p and put
    cu_seqlens where FA2 has dq, dk, dv: the adapter must refuse them, not mis-call them."""
    with pytest.raises(ValueError, match="FA3"):
        make_flash_kernel(_fa3_forward, _fa3_backward)
    fake = flash_attn_module()
    fake.flash_attn_interface._flash_attn_forward = _fa3_forward
    fake.flash_attn_interface._flash_attn_backward = _fa3_backward
    with installed(fake):
        report = attention_backend_report("cpu", torch.bfloat16, head_dim=64)
    assert report["backend"] == "sdpa" and "signature" in report["flash_import_error"]


def test_deterministic_algorithms_select_flash_deterministic_backward():
    fake = flash_attn_module("2.6.0")
    bwd, seen = fake.flash_attn_interface._flash_attn_backward, []

    @functools.wraps(bwd)
    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return bwd(*args, **kwargs)

    fake.flash_attn_interface._flash_attn_backward = recording
    before = torch.are_deterministic_algorithms_enabled()
    try:
        with installed(fake):
            for flag in (False, True):
                torch.use_deterministic_algorithms(flag)
                run("flash", *make("window", torch.bfloat16))
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen and set(seen) == {False, True} and seen[-1] is True


# ---- packed documents (DocCausal) through flash-attn's varlen API ----


def check_docs_against_sdpa(case, module):
    """DocCausal through the flash adapter (varlen, bf16, on `module`) vs fp64 SDPA."""
    q, q_nope, groups = doc_helpers.make(**doc_helpers.CASES[case], dtype=torch.bfloat16)
    with installed(module):
        out, grads = run("flash", q, q_nope, groups)
    ref, ref_grads = run("sdpa", *upcast(q, q_nope, groups))
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", range(len(doc_helpers.CASES)))
def test_doc_causal_through_flash_varlen_matches_sdpa(case, version):
    check_docs_against_sdpa(case, flash_attn_module(version))


@pytest.mark.parametrize("seed", range(3))
def test_doc_causal_irregular_layouts_through_flash_varlen(seed):
    """Several key runs per document: bands that share query rows, merged by log-sum-exp."""
    q, q_nope, groups = doc_helpers.irregular(seed, torch.bfloat16)
    with installed(flash_attn_module("2.8.3")):
        out, grads = run("flash", q, q_nope, groups)
    ref, ref_grads = run("sdpa", *upcast(q, q_nope, groups))
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", [4])  # a non-square band (cache keys before the queries)
def test_mutation_varlen_top_left_alignment_is_caught(case):
    with pytest.raises(AssertionError):
        check_docs_against_sdpa(case, flash_attn_module("2.8.3", top_left=True))


def test_mutation_shifted_cu_seqlens_is_caught(monkeypatch):
    """A cu_seqlens off by one at a document boundary (total and max kept valid) must fail."""
    real = documents._calls

    def shifted(*args):
        calls = real(*args)
        c = calls[0]
        cu_q = c.cu_q.clone()
        cu_q[1] += 1
        return [c._replace(cu_q=cu_q, max_q=c.max_q + 1), *calls[1:]]

    monkeypatch.setattr(documents, "_calls", shifted)
    with pytest.raises(AssertionError):
        check_docs_against_sdpa(5, flash_attn_module("2.8.3"))


def test_adapter_passes_int32_cu_seqlens_on_q_device_and_int_max_seqlen():
    fake = flash_attn_module("2.8.3")
    fwd, seen = fake.flash_attn_interface._flash_attn_varlen_forward, []

    def recording(q, k, v, **kwargs):
        seen.append((q.device, kwargs))
        return fwd(q, k, v, **kwargs)

    fake.flash_attn_interface._flash_attn_varlen_forward = recording
    recording._init_fn = fwd._init_fn  # keep the custom op's visible signature
    with installed(fake):
        run("flash", *doc_helpers.make(window=3, dtype=torch.bfloat16))
    assert seen
    for device, kw in seen:
        for name in ("cu_seqlens_q", "cu_seqlens_k"):
            assert kw[name].dtype == torch.int32 and kw[name].device == device
        assert type(kw["max_seqlen_q"]) is int and kw["causal"] is False
    # one call per band shape; documents attending to themselves with window 3 are (2, 0)
    assert (2, 0) in {(kw["window_size_left"], kw["window_size_right"]) for _, kw in seen}


def varlen_inputs(lengths_q, lengths_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), 2, 16, generator=gen).bfloat16()
    k = torch.randn(sum(lengths_k), 2, 16, generator=gen).bfloat16()
    cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32)
          for x in (lengths_q, lengths_k)]  # fmt: skip
    return q, k, k.clone(), *cu


def test_contract_varlen_aligns_bottom_right_per_sequence():
    """Each sequence equals a separate flash call with its own lengths (docstring examples)."""
    q, k, v, cu_q, cu_k = varlen_inputs([2, 5], [5, 2])
    out, lse = contract_varlen_forward(q, k, v, cu_q, cu_k, 5, 5, 0.25, -1, 0, causal=True)
    assert lse.shape == (2, 7) and lse.dtype == torch.float32
    for (a, b), (c, d) in [((0, 2), (0, 5)), ((2, 7), (5, 7))]:
        o, l = contract_forward(q[None, a:b], k[None, c:d], v[None, c:d], 0.25, -1, 0, True)
        torch.testing.assert_close(out[a:b], o[0])
        torch.testing.assert_close(lse[:, a:b], l[0])
    # second sequence (5 queries, 2 keys): its first three queries see nothing
    assert bool((lse[:, 2:5] == float("inf")).all()) and bool((out[2:5] == 0).all())


def test_contract_varlen_rejects_what_flash_would_mis_run():
    q, k, v, cu_q, cu_k = varlen_inputs([3, 4], [3, 4])

    def call(cu_q=cu_q, cu_k=cu_k, max_q=4, max_k=4):
        return contract_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.25, -1, 0, True)

    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        call(cu_q=cu_q.long())
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be on q's device"):
        call(cu_k=cu_k.to("meta"))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must rise from 0 to 7"):
        call(cu_q=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="max_seqlen is 3"):
        call(max_q=3)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must have shape"):
        call(cu_k=torch.tensor([0, 7], dtype=torch.int32))
