"""Attention stages of the GPU smoke check (``benchmarks/gpu_smoke.py`` imports these).

- ``flash_stage``: flash-attn's ``flash_attn_func`` against an fp64 reference (the contract
  model's definition of flash's semantics) over head dims, q/k lengths and windows: out, lse
  and gradients.
- ``attend_stage``: ``attend()`` with backends flash and compiled flex in bf16 against an fp64
  CPU SDPA reference, for every attention pattern the models use (and packed documents,
  ``DocCausal``: flash varlen and per-row flex masks), forward and gradients; the number of
  graphs flex compiled is recorded.

On a GPU both run the real kernels. With ``dry_run`` (CPU) flash is the contract model from
``titans_train.testing.flash_contract`` (so the stage checks the harness, not flash-attn) and flex
runs forward only, compiled with dynamo's "eager" backend (flex has no backward on CPU).

    python benchmarks/gpu_smoke_attention.py --smoke [--out FILE]   # both stages, dry run, JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from torch import Tensor

from titans_train.models.attention import Causal, DocCausal, KeyGroup, Visible, attend
from titans_train.models.attention.flash import flash_api
from titans_train.models.attention.flex import flex_attend
from titans_train.models.attention.rules import key_layout
from titans_train.testing.flash_contract import (
    contract_backward,
    contract_forward,
    flash_attn_module,
    installed,
)

HEAD_DIMS = (48, 64, 96, 128, 256)
WINDOWS = {  # name -> (causal, (left, right))
    "none": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "(0,0)": (False, (0, 0)),
    "(16,0)": (False, (16, 0)),
    "(999,0)": (False, (999, 0)),
    "two-sided(8,4)": (False, (8, 4)),
}
OUT_TOL, GRAD_TOL = 2e-2, 4e-2  # bf16, relative to the reference's largest magnitude


def _err(got: Tensor, ref: Tensor) -> float:
    """Largest deviation relative to the reference's scale (inf rows must match exactly)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(got), inf) or not torch.equal(got[inf], ref[inf]):
        return float("inf")
    if (~inf).sum() == 0:
        return 0.0
    diff = (got[~inf] - ref[~inf]).abs().max().item()
    return diff / max(1.0, ref[~inf].abs().max().item())


def _flash_context(device: torch.device, dry_run: bool, contract=None):
    if dry_run or device.type != "cuda":
        return installed(contract or flash_attn_module())
    return contextlib.nullcontext()


def _flash_case(func, device, d, n_q, n_k, causal, window, gen) -> dict:
    q, k, v = (torch.randn(2, n, 2, d, generator=gen) for n in (n_q, n_k, n_k))
    qb, kb, vb = (x.to(device, torch.bfloat16).requires_grad_() for x in (q, k, v))
    out, lse, _ = func(qb, kb, vb, causal=causal, window_size=window, return_attn_probs=True)
    dout = torch.randn(out.shape, generator=gen).to(device, torch.bfloat16)
    dq, dk, dv = torch.autograd.grad(out, (qb, kb, vb), dout)
    r = [x.detach().cpu().double() for x in (qb, kb, vb)]  # the same bf16 values, in fp64
    scale = d**-0.5
    ref_out, ref_lse = contract_forward(*r, scale, *window, causal)
    grads = contract_backward(dout.cpu().double(), *r, ref_out, ref_lse, scale, *window, causal)
    errs = {"out": _err(out, ref_out), "lse": _err(lse, ref_lse)}
    errs.update({n: _err(g, rg) for n, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), grads)})
    ok = errs["out"] <= OUT_TOL and errs["lse"] <= OUT_TOL
    ok = ok and all(errs[n] <= GRAD_TOL for n in ("dq", "dk", "dv"))
    return {"head_dim": d, "n_q": n_q, "n_k": n_k, "causal": causal, "window": list(window),
            "errors": errs, "ok": ok}  # fmt: skip


def flash_stage(device: torch.device, dry_run: bool, contract=None) -> dict:
    """flash-attn (real on GPU; the contract model on a dry run) against the fp64 reference.

    contract: the fake flash_attn module for a dry run (default: the faithful contract model;
    tests pass the mutated one to see the stage fail)."""
    lengths = [(16, 16), (9, 23), (23, 9), (1, 129)]
    if not dry_run:
        lengths += [(256, 256), (128, 512)]
    cases, failures = [], []
    with _flash_context(device, dry_run, contract):
        api = flash_api()
        if isinstance(api, str):
            return {"ok": False, "cases": [], "failures": [api], "flash": None}
        from flash_attn import flash_attn_func

        gen = torch.Generator().manual_seed(0)
        for d in HEAD_DIMS:
            for n_q, n_k in lengths:
                for name, (causal, window) in WINDOWS.items():
                    try:
                        case = _flash_case(flash_attn_func, device, d, n_q, n_k, causal,
                                           window, gen)  # fmt: skip
                    except Exception as e:  # a refusal is a failure, recorded with its case
                        case = {"head_dim": d, "n_q": n_q, "n_k": n_k, "window": name,
                                "ok": False, "error": f"{type(e).__name__}: {e}"}  # fmt: skip
                    case["window_name"] = name
                    cases.append(case)
                    if not case["ok"]:
                        failures.append(case)
        flash = {"version": api.version, "signature": api.style, "contract": api.contract}
    return {"ok": not failures, "cases": cases, "failures": failures, "flash": flash,
            "reference": "fp64 model of flash-attn's documented semantics"
            + (" (dry run: flash is that same model, so this checks the harness)" if dry_run
               else "")}  # fmt: skip


def patterns(s: int) -> dict:
    """Every attention pattern the models use, at size scale s: name -> (n_q, [(rule, n_k)])."""
    n, w, c, p = 13 * s, 4 * s, 5 * s, 3
    return {
        "window": (n, [(Causal(0, 0, window=w), n)]),
        "window_persistent_cache": (c, [(Visible(), p), (Causal(2 * c, c, window=w), 2 * c)]),
        "full_causal": (n, [(Causal(0, 0), n)]),
        "mac_segment": (n, [(Visible(), p), (Causal(0, 0, segment=c), n),
                            (Causal(0, 0, segment=c), n)]),
        "mac_memory_tokens": (n, [(Visible(), p), (Visible(), 4), (Causal(0, 0, segment=c), n)]),
        "one_query_many_keys": (1, [(Visible(), p), (Causal(n - 1, 0, window=w), n)]),
        "packed_documents": (n, [(Visible(), p), (_docs(n, s, window=w), n)]),
        "packed_documents_segment": (n, [(Visible(), p), (_docs(n, s, segment=c), n)]),
    }  # fmt: skip


def _docs(n: int, s: int, **kw) -> DocCausal:
    """Two rows of documents with different boundaries, one padding token in row 1."""
    cuts = [[0, 5 * s, n], [0, 3 * s, 3 * s + 1, n]]
    doc = torch.full((2, n), -1, dtype=torch.int64)
    pos = torch.zeros(2, n, dtype=torch.int64)
    for b, row in enumerate(cuts):
        for i, (a, e) in enumerate(zip(row, row[1:])):
            if not (b == 1 and i == 1):  # row 1's second span is padding
                doc[b, a:e], pos[b, a:e] = i, torch.arange(e - a)
    return DocCausal(doc, pos, doc, pos, **kw)


def _on(rule, device):
    """The rule with its per-row tensors on device (DocCausal holds data)."""
    if not isinstance(rule, DocCausal):
        return rule
    moved = (x.to(device) for x in (rule.q_doc, rule.q_pos, rule.k_doc, rule.k_pos))
    return DocCausal(*moved, rule.window, rule.segment)


def _inputs(n_q, spec, d, gen):
    def rnd(m):
        return torch.randn(2, 2, m, d, generator=gen, dtype=torch.float64)

    return rnd(n_q), rnd(n_q), [(rnd(m), rnd(m), rule) for rule, m in spec]


def _run(fn, q, q_nope, groups, dtype, device, grad):
    """Output and gradients of fn(q, groups, q_nope) at dtype/device; grads None if not grad."""
    leaves = [x.detach().to(device, dtype).requires_grad_(grad) for x in (q, q_nope)]
    kv = [(k.detach().to(device, dtype).requires_grad_(grad),
           v.detach().to(device, dtype).requires_grad_(grad), _on(r, device))
          for k, v, r in groups]  # fmt: skip
    gs = [KeyGroup(k, v, r) for k, v, r in kv]
    leaves += [t for k, v, _ in kv for t in (k, v)]
    with torch.set_grad_enabled(grad):
        out = fn(leaves[0], gs, leaves[1])
    if not grad:
        return out, None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * w.to(out)).sum(), leaves, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def attend_stage(device: torch.device, dry_run: bool) -> dict:
    """attend() with flash and compiled flex in bf16 against fp64 CPU SDPA, every pattern."""
    import torch._dynamo

    cpu_flex = device.type != "cuda"
    d, s = (16, 1) if dry_run else (64, 16)

    def flex(q, groups, q_nope):
        if cpu_flex:  # forward only; compiled with dynamo's eager backend
            return flex_attend(q, groups, q_nope, key_layout(groups), compile_backend="eager")
        return attend(q, groups, q_nope=q_nope, backend="flex")

    def flash(q, groups, q_nope):
        return attend(q, groups, q_nope=q_nope, backend="flash")

    def sdpa(q, groups, q_nope):
        return attend(q, groups, q_nope=q_nope, backend="sdpa")

    cases, failures, gen = [], [], torch.Generator().manual_seed(0)
    graphs_before = _graphs()
    # One graph per pattern shape: past dynamo's recompile_limit (8) the last patterns would
    # silently run flex uncompiled, so the stage raises the limit for its own calls.
    with _flash_context(device, dry_run), torch._dynamo.config.patch(recompile_limit=64):
        for name, (n_q, spec) in patterns(s).items():
            q, q_nope, groups = _inputs(n_q, spec, d, gen)
            ref, ref_grads = _run(sdpa, q, q_nope, groups, torch.float64, "cpu", True)
            for backend, fn in (("flash", flash), ("flex", flex)):
                grad = not (backend == "flex" and cpu_flex)
                case = {"pattern": name, "backend": backend, "grads_checked": grad}
                try:
                    out, grads = _run(fn, q, q_nope, groups, torch.bfloat16, device, grad)
                    case["out_err"] = _err(out, ref)
                    case["grad_err"] = max(map(_err, grads, ref_grads)) if grad else None
                    case["ok"] = case["out_err"] <= OUT_TOL and (
                        not grad or case["grad_err"] <= GRAD_TOL
                    )
                except Exception as e:
                    case.update(ok=False, error=f"{type(e).__name__}: {e}")
                cases.append(case)
                if not case["ok"]:
                    failures.append(case)
        compiles = _mac_segments_compiles(flex, device, d, s, gen)
    notes = ["flex: forward only on CPU (FlexAttention has no CPU backward)"] if cpu_flex else []
    if dry_run:
        notes.append("flash is the contract model (dry run)")
    return {"ok": not failures, "cases": cases, "failures": failures,
            "flex_graphs": _graphs() - graphs_before, "flex_graphs_over_6_mac_segments": compiles,
            "notes": notes}  # fmt: skip


def _mac_segments_compiles(flex, device: torch.device, d: int, s: int, gen) -> int:
    """Graphs flex compiles over 6 MAC segments of one layout (should be 1)."""
    c = 5 * s
    before = _graphs()
    for i in range(6):
        rule = Causal(i * c, i * c, segment=c)
        q, q_nope, groups = _inputs(c, [(Visible(), 3), (rule, c), (rule, c)], d, gen)
        _run(flex, q, q_nope, groups, torch.bfloat16, device, False)
    return _graphs() - before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="dry run on CPU (the contract model)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    result = {
        "flash": flash_stage(device, dry_run=not cuda),
        "attend": attend_stage(device, dry_run=not cuda),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(r["ok"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
