"""Probe: is a Titans LM chaotic across segments at initialisation, and where is MAC's gain?

Everything runs in float64, in eval mode, on random tokens:

- ``sensitivity``: the max relative logit change per segment when every parameter is perturbed by
  a relative ``eps`` (``params``), or only the embeddings of the first segment (``input``; what
  reaches later segments then travels through the carried state alone).
- ``gain`` (memory variants): the per-segment gain of the segment map M_{i-1} -> M_i, estimated by
  finite differences on the memory state (weights and momentum of every block) carried between
  calls with ``state=`` (streaming equals one call, so this is the model's own map). The
  perturbation is carried from segment to segment and renormalised (Benettin's method), so the
  geometric mean of the gains is the largest Lyapunov exponent per segment: > 1 is chaos.
  ``self_gain``: the same for each block's memory alone (the feedback loop inside one block).
- ``diagnostics`` (MAC): per segment and block, the norms of the memory weights and momentum,
  the gates theta, eta, alpha used by the writes, and RMS(h) / RMS(segment input) of the read.

Experiments (``--experiments``) change one factor at a time, by config or by patching the built
model (never the model code): inner step size, momentum, forgetting, value scale, memory depth,
residual LayerNorm, what MAC writes, and cutting the feedback loop (retrieval from M_0).

    python benchmarks/probe_mac.py --out runs/probe_mac.json
    python benchmarks/probe_mac.py --smoke
    python benchmarks/probe_mac.py --checkpoint RUN_DIR --segments 32 --out probe.json

``--checkpoint`` runs the gain, gradient-reach and memory probes on a trained model instead
(benchmarks/probe_trained.py).

Findings: docs/results.md, "MAC is chaotic across segments at init".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn
from probe_build import BASE, DT, EXPERIMENTS, GATES, build  # noqa: F401 (re-exported)

from titans_train.models import TitansLM
from titans_train.models.memory import MemoryState

SMOKE_EXPERIMENTS = ("default", "alpha_0", "read_M0")
RUNS = [("mac", "per_token"), ("mac", "memory_tokens"), ("mag", None), ("mal", None), ("lmm", None)]
RUNS += [("transformer", None)]


def perturb_params(model: nn.Module, eps: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g, dtype=p.dtype))


def per_segment(delta: torch.Tensor, base: torch.Tensor, seg: int) -> list[float]:
    """max |delta| / max |base| over each segment's positions."""
    n = base.shape[1] // seg
    return [
        float(
            delta[:, i * seg : (i + 1) * seg].abs().max()
            / base[:, i * seg : (i + 1) * seg].abs().max()
        )
        for i in range(n)
    ]


@torch.no_grad()
def sensitivity(variant, retrieval, exp, tokens, eps: float, mode: str, seed: int = 0) -> list:
    """Per-segment relative logit change under a relative ``eps`` perturbation (see module doc)."""
    seg = BASE["segment_len"]
    model = build(variant, retrieval, exp, seed)
    base = model(tokens).logits
    other = build(variant, retrieval, exp, seed)
    if mode == "params":
        perturb_params(other, eps, seed + 100)
    else:
        g = torch.Generator().manual_seed(seed + 100)

        def hook(_module, _inputs, out):
            noise = torch.zeros_like(out)
            noise[:, :seg] = torch.randn(out[:, :seg].shape, generator=g, dtype=out.dtype)
            return out + eps * out.abs() * noise

        other.embed.register_forward_hook(hook)
    return per_segment(other(tokens).logits - base, base, seg)


def gradient_reach(model: TitansLM, tokens: torch.Tensor, seg: int = 0) -> list[float]:
    """|d f / d (embeddings of segment j)| for f = the squared logits of the last segment, over
    |d f / d (embeddings of the last segment)|: how much of a late loss's gradient reaches each
    earlier segment through the carried state (what learning recall across segments needs).
    ``seg``: the segment length (default: the probe model's)."""
    seg = seg or BASE["segment_len"]
    emb = model.embed(tokens).detach().requires_grad_(True)
    hook = model.embed.register_forward_hook(lambda _m, _i, _o: emb)
    try:
        model(tokens).logits[:, -seg:].pow(2).sum().backward()
    finally:
        hook.remove()
    g = emb.grad.pow(2).sum(-1)
    norms = [float(g[:, i * seg : (i + 1) * seg].sum().sqrt()) for i in range(g.shape[1] // seg)]
    return [v / norms[-1] for v in norms]


def map_memory(bs, fn):
    """A copy of block state ``bs`` with ``fn`` applied to each float tensor of its carried memory
    state, in a fixed order: the written memory's weights, momentum, buffer and conv tail, then
    the MAC retrieval view's conv tail (its weights are replaced by M at every segment start)."""

    def seq(ts):
        return None if ts is None else type(ts)(fn(t) for t in ts)

    def tail(m: MemoryState) -> torch.Tensor | None:
        return None if m.conv_tail is None else fn(m.conv_tail)

    m, r = bs.mem, bs.retr
    if m is not None:
        m = MemoryState(seq(m.weights), seq(m.momentum), seq(m.buffer), tail(m), m.pos)
    if r is not None:
        r = MemoryState(r.weights, r.momentum, r.buffer, tail(r), r.pos)
    return replace(bs, mem=m, retr=r)


def flatten(state, blocks) -> list[torch.Tensor]:
    out = []
    for l in blocks:
        map_memory(state.blocks[l], lambda t: out.append(t) or t)
    return out


def perturbed(state, blocks, delta: list[torch.Tensor]):
    it = iter(delta)
    new = list(state.blocks)
    for l in blocks:
        new[l] = map_memory(state.blocks[l], lambda t: t + next(it))
    return replace(state, blocks=new)


def norm(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


@torch.no_grad()
def segment_gains(model, tokens, eps: float, blocks, seed: int = 0, seg: int = 0) -> list[float]:
    """Finite-difference gain of the segment map on the memory state of ``blocks``, with the
    perturbation carried and renormalised from segment to segment (module doc)."""
    seg = seg or BASE["segment_len"]
    g = torch.Generator().manual_seed(seed)
    st, direction, gains = None, None, []
    for i in range(tokens.shape[1] // seg):
        x = tokens[:, i * seg : (i + 1) * seg]
        out = model(x, state=st)
        if st is not None:
            ref = flatten(st, blocks)
            if direction is None:
                direction = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ref]
            scale = eps * norm(ref) / norm(direction)
            delta = [scale * d for d in direction]
            moved = model(x, state=perturbed(st, blocks, delta))
            direction = [
                a - b for a, b in zip(flatten(moved.state, blocks), flatten(out.state, blocks))
            ]
            gains.append(norm(direction) / norm(delta))
        st = out.state
    return gains


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-300)) for x in xs) / len(xs)) if xs else float("nan")


def record_memory_calls(model: TitansLM, log: list[dict]) -> None:
    """Wrap each block memory's forward to log the gates of writes and the size of reads."""
    for l, block in enumerate(model.blocks):
        memory = block.memory
        forward, gates = memory.forward, memory._gates

        def logged_gates(x, memory=memory, gates=gates, l=l):
            theta, log_eta, log_keep = gates(x)
            log.append(
                dict(
                    block=l,
                    theta=float(theta.mean()),
                    eta=float(log_eta.exp().mean()),
                    alpha=float(1 - log_keep.exp().mean()),
                    theta_max=float(theta.max()),
                )
            )
            return theta, log_eta, log_keep

        def logged_forward(x, state=None, read_only=False, queries=None, forward=forward, l=l):
            out, st = forward(x, state, read_only=read_only, queries=queries)
            if read_only:
                rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
                log.append(dict(block=l, read_over_input=rms(out) / rms(x)))
            return out, st

        memory._gates, memory.forward = logged_gates, logged_forward


def diagnostics(variant, retrieval, exp, tokens, seed: int = 0) -> list[dict]:
    """``memory_rows`` of the probe model (variant, retrieval, experiment)."""
    return memory_rows(build(variant, retrieval, exp, seed), tokens)


@torch.no_grad()
def memory_rows(model: TitansLM, tokens: torch.Tensor, seg: int = 0) -> list[dict]:
    """Per segment and block: memory weight / momentum norms (Frobenius, mean over batch x heads,
    per memory layer), their relative change over the segment, the gates used by the writes
    (means, and the max of theta), and RMS(h) / RMS(segment input) of MAC's read. Wraps the
    model's memories (``record_memory_calls``): pass a model used for nothing else."""
    seg = seg or BASE["segment_len"]
    log, rows, st = [], [], None
    record_memory_calls(model, log)
    for i in range(tokens.shape[1] // seg):
        log.clear()
        out = model(tokens[:, i * seg : (i + 1) * seg], state=st)
        for l, bs in enumerate(out.state.blocks):
            w, s = bs.mem.weights, bs.mem.momentum
            row: dict = dict(segment=i, block=l)
            row["weight_norm"] = [float(t.norm(dim=(-2, -1)).mean()) for t in w]
            row["momentum_norm"] = [float(t.norm(dim=(-2, -1)).mean()) for t in s]
            if st is not None:
                w0 = st.blocks[l].mem.weights
                row["weight_change"] = [float((a - b).norm() / b.norm()) for a, b in zip(w, w0)]
            for entry in log:
                if entry["block"] == l:
                    row.update({k: v for k, v in entry.items() if k != "block"})
            rows.append(row)
        st = out.state
    return rows


def growth(sens: list[float]) -> float:
    """Per-segment growth factor of a sensitivity curve: exp of the least-squares slope of log."""
    n = len(sens)
    xs, ys = range(n), [math.log(max(v, 1e-300)) for v in sens]
    mx, my = (n - 1) / 2, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return math.exp(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 1.0


def probe_run(variant, retrieval, exp, tokens, eps: float, seed: int, with_input: bool) -> dict:
    """Sensitivity and segment-map gains of one model (variant, retrieval mode, experiment)."""
    start = time.time()
    res: dict = dict(variant=variant, retrieval=retrieval, seed=seed)
    res["sensitivity_params"] = sens = sensitivity(
        variant, retrieval, exp, tokens, eps, "params", seed
    )
    res["growth"] = growth(sens)
    res["gradient_reach"] = gradient_reach(build(variant, retrieval, exp, seed), tokens)
    if with_input:
        res["sensitivity_input"] = sensitivity(variant, retrieval, exp, tokens, eps, "input", seed)
    if variant != "transformer":
        model = build(variant, retrieval, exp, seed)
        n_blocks = len(model.blocks)
        res["gain"] = segment_gains(model, tokens, eps, list(range(n_blocks)), seed)
        skip = len(res["gain"]) // 4  # the first steps mostly measure the random start direction
        res["gain_geomean"] = geomean(res["gain"][skip:])
        res["self_gain_geomean"] = [
            geomean(segment_gains(model, tokens, eps, [l], seed)[skip:]) for l in range(n_blocks)
        ]
        with torch.no_grad():
            state = model(tokens).state
        res["final_weight_norm"] = [
            [float(t.norm(dim=(-2, -1)).mean()) for t in bs.mem.weights] for bs in state.blocks
        ]
    res["seconds"] = round(time.time() - start, 2)
    return res


def summarise(results: list[dict]) -> list[dict]:
    """One row per (experiment, variant, retrieval): mean, min and max over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["experiment"], r["variant"], r["retrieval"]), []).append(r)
    rows = []
    for (name, variant, retrieval), rs in groups.items():
        row = dict(experiment=name, variant=variant, retrieval=retrieval, seeds=len(rs))
        for key in ("growth", "gain_geomean"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals))
        row["last_sensitivity"] = sorted(r["sensitivity_params"][-1] for r in rs)[len(rs) // 2]
        row["first_gradient_reach"] = sorted(r["gradient_reach"][0] for r in rs)[len(rs) // 2]
        if "final_weight_norm" in rs[0]:  # the last memory layer, averaged over blocks and seeds
            norms = [bw[-1] for r in rs for bw in r["final_weight_norm"]]
            row["final_last_layer_norm"] = sum(norms) / len(norms)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: sensitivity growth and segment-map gain, mean [min, max] over seeds."""

    def cell(d: dict | None) -> str:
        return "-" if d is None else f"{d['mean']:.2f} [{d['min']:.2f}, {d['max']:.2f}]"

    lines = [
        "| model | experiment | sensitivity growth / segment | segment-map gain | "
        "sensitivity at the last segment | gradient reach, first segment | "
        "last memory layer norm at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = r["variant"] + (f" {r['retrieval']}" if r["retrieval"] else "")
        norm_ = r.get("final_last_layer_norm")
        lines.append(
            f"| {model} | {r['experiment']} | {cell(r.get('growth'))} | "
            f"{cell(r.get('gain_geomean'))} | {r['last_sensitivity']:.1e} | "
            f"{r['first_gradient_reach']:.1e} | "
            f"{'-' if norm_ is None else f'{norm_:.2f}'} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eps", type=float, default=1e-7)
    ap.add_argument("--seeds", type=int, default=3, help="model init and token seeds 0..n-1")
    ap.add_argument("--experiments", nargs="*", default=None, help=f"of {', '.join(EXPERIMENTS)}")
    ap.add_argument("--variant", default="mac", help="the model the experiments change")
    ap.add_argument("--retrieval", default="per_token", help="its MAC retrieval mode")
    ap.add_argument("--no-baselines", action="store_true", help="skip the default of every variant")
    ap.add_argument("--smoke", action="store_true", help="4 segments, batch 1, one seed, MAC only")
    ap.add_argument("--out", help="write the JSON here (default: stdout)")
    ap.add_argument("--checkpoint", help="probe this trained run instead (probe_trained.py)")
    ap.add_argument("--segment-len", type=int, default=0, help="--checkpoint: piece length")
    ap.add_argument("--kinds", nargs="*", default=["random", "text"], help="--checkpoint inputs")
    args = ap.parse_args(argv)
    if args.checkpoint:
        for kind in args.kinds:
            if kind not in ("random", "text"):
                ap.error(f"unknown --kinds {kind!r}; known: random, text")
        if args.experiments or args.smoke or args.no_baselines:
            ap.error("--checkpoint probes the trained model as it is: no experiments or --smoke")
        return args
    if args.smoke:
        args.segments, args.batch, args.seeds = 4, 1, 1
    args.names = args.experiments or (SMOKE_EXPERIMENTS if args.smoke else list(EXPERIMENTS))
    for name in args.names:
        if name not in EXPERIMENTS:
            ap.error(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.checkpoint:
        return main_checkpoint(args)
    T = args.segments * BASE["segment_len"]
    report: dict = dict(config=dict(BASE, batch=args.batch, tokens=T, eps=args.eps), results=[])
    baselines = [] if args.no_baselines else (RUNS[:2] if args.smoke else RUNS)
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, BASE["vocab_size"], (args.batch, T), generator=g)
        jobs = [(v, r, "default", True) for v, r in baselines]
        retrieval = args.retrieval if args.variant == "mac" else None
        names = [n for n in args.names if n != "default" or args.no_baselines]
        jobs += [(args.variant, retrieval, n, False) for n in names]
        for variant, retr, name, with_input in jobs:
            res = probe_run(variant, retr, EXPERIMENTS[name], tokens, args.eps, seed, with_input)
            report["results"].append(dict(res, experiment=name))
            print(
                f"seed {seed} {variant} {retr} {name}: growth {res['growth']:.2f}", file=sys.stderr
            )
        if seed == 0:
            report["diagnostics"] = {
                f"{v} {r} {n}": diagnostics(v, r, EXPERIMENTS[n], tokens)
                for v, r, n in [
                    ("mac", "per_token", "default"),
                    ("mac", "memory_tokens", "default"),
                    ("mac", "per_token", "alpha_0"),
                    ("lmm", None, "default"),
                ]
            }
    report["summary"] = summarise(report["results"])
    print(table(report["summary"]), file=sys.stderr)
    return emit(report, args.out)


def emit(report: dict, out: str | None) -> dict:
    """The report as JSON: to ``out`` when given, else to stdout."""
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        print(text)
    return report


def main_checkpoint(args: argparse.Namespace) -> dict:
    from probe_trained import probe_checkpoint
    from probe_trained import table as trained_table

    report = probe_checkpoint(args.checkpoint, args)
    print(trained_table(report), file=sys.stderr)
    return emit(report, args.out)


if __name__ == "__main__":
    main()
