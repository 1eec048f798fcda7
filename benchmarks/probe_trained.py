"""``probe_mac.py --checkpoint RUN_DIR``: the probes of probe_mac.py on a trained model.

The model is loaded with ``titans_train.load.open_checkpoint`` (a run directory, a
``step_XXXXXXXX`` directory or a ``titans-export`` directory) and run in float64, eval mode, in
pieces of its own segment length (``model.segment_len``; ``--segment-len`` overrides), on two
kinds of input:

- ``random``: token ids drawn uniformly from the tokenizer's vocabulary;
- ``text``: pass-key examples of the probe's length (``titans_train.synthetic``, needle depth
  0-0.4 as in the study's training mix), encoded with the checkpoint's tokenizer.

For each seed: the segment-map gains (and their geometric mean from the second quarter on, and
per block), the gradient reach of the last segment's squared logits back to every segment; for
seed 0 the per-segment memory rows (weight and momentum norms, the gates theta, eta, alpha used
by the writes, MAC's RMS(h) / RMS(input)). The summary gives what docs/results.md tabulates,
plus alpha and the last memory layer's norm against the number of segments written, and the
share of a write still kept after the whole probe length (the product of the mean keep 1 - alpha
per segment, so an estimate from means).
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import probe_mac as P
import torch

from titans_train.load import open_checkpoint
from titans_train.synthetic import generate

KINDS = ("random", "text")


def probe_tokens(kind: str, ckpt, length: int, batch: int, seed: int) -> torch.Tensor:
    """[batch, length] ids of one input kind (module doc)."""
    if kind == "random":
        vocab = (ckpt.tokenizer_identity or {}).get("vocab_size") or ckpt.model_config.vocab_size
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, length), generator=g)
    tok = ckpt.tokenizer()
    enc = lambda s: tok.encode_batch([s])[0].tolist()  # noqa: E731
    examples = generate("passkey", length, batch, enc, seed=seed, depth=(0.0, 0.4))
    return torch.tensor([ex.tokens for ex in examples], dtype=torch.int64)


def has_memory(model) -> bool:
    return all(getattr(b, "memory", None) is not None for b in model.blocks)


def probe_seed(model, tokens: torch.Tensor, eps: float, seg: int, seed: int) -> dict:
    """Gains and gradient reach of one token batch (``model`` is left unchanged)."""
    res: dict = {"seed": seed}
    res["gradient_reach"] = P.gradient_reach(model, tokens, seg)
    model.zero_grad(set_to_none=True)
    if has_memory(model):
        n = len(model.blocks)
        res["gain"] = gains = P.segment_gains(model, tokens, eps, list(range(n)), seed, seg)
        skip = len(gains) // 4  # the first steps mostly measure the random start direction
        res["gain_geomean"] = P.geomean(gains[skip:])
        res["self_gain_geomean"] = [
            P.geomean(P.segment_gains(model, tokens, eps, [b], seed, seg)[skip:]) for b in range(n)
        ]
    return res


def summary(seeds: list[dict], rows: list[dict], seg: int) -> dict:
    """What the docs tabulate: gain range, median reach to segment 1, and the memory rows'
    gates and norms per block (mean over segments; alpha and the last layer's norm per segment)."""
    out: dict = {"first_gradient_reach": statistics.median(r["gradient_reach"][0] for r in seeds)}
    if "gain_geomean" in seeds[0]:
        g = [r["gain_geomean"] for r in seeds]
        out["gain_geomean"] = {"mean": sum(g) / len(g), "min": min(g), "max": max(g)}
    blocks: dict = {}
    for r in rows:
        b = blocks.setdefault(r["block"], {"alpha": [], "theta": [], "eta": [], "norm": []})
        b["alpha"].append(r.get("alpha", float("nan")))
        b["theta"].append(r.get("theta", float("nan")))
        b["eta"].append(r.get("eta", float("nan")))
        b["norm"].append(r["weight_norm"][-1])
        if "read_over_input" in r:
            b.setdefault("read_over_input", []).append(r["read_over_input"])
    per_block = []
    for b in blocks.values():
        keep = math.prod((1 - a) ** seg for a in b["alpha"][1:])  # written in segment 1
        item = {k: sum(b[k]) / len(b[k]) for k in ("alpha", "theta", "eta")}
        item.update(alpha_by_segment=b["alpha"], last_layer_norm_by_segment=b["norm"])
        item["kept_of_first_write"] = keep
        if "read_over_input" in b:
            item["read_over_input"] = [min(b["read_over_input"]), max(b["read_over_input"])]
        per_block.append(item)
    out["blocks"] = per_block
    return out


def probe_checkpoint(spec: str, args) -> dict:
    """Every probe of a checkpoint (module doc); the JSON of ``--checkpoint``."""
    ckpt = open_checkpoint(spec)
    model = ckpt.model().to(P.DT).eval()
    seg = args.segment_len or ckpt.model_config.segment_len
    length = args.segments * seg
    report: dict = dict(
        checkpoint=str(Path(ckpt.path)), step=ckpt.step, variant=ckpt.model_config.variant,
        segment_len=seg, tokens=length, batch=args.batch, eps=args.eps, probes={},
    )  # fmt: skip
    for kind in args.kinds:
        seeds = []
        for seed in range(args.seeds):
            tokens = probe_tokens(kind, ckpt, length, args.batch, seed)
            seeds.append(probe_seed(model, tokens, args.eps, seg, seed))
        rows: list[dict] = []
        if has_memory(model):
            first = probe_tokens(kind, ckpt, length, args.batch, 0)
            rows = P.memory_rows(copy.deepcopy(model), first, seg)
        report["probes"][kind] = dict(seeds=seeds, rows=rows, summary=summary(seeds, rows, seg))
    return report


def table(report: dict) -> str:
    """Markdown, one row per input kind."""
    lines = [
        "| input | gain / segment | gradient reach to segment 1 | alpha used, per block | "
        "theta | eta | last memory layer norm, first / last segment |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, probe in report["probes"].items():
        s = probe["summary"]
        g = s.get("gain_geomean")
        gain = "-" if g is None else f"{g['mean']:.3f} [{g['min']:.3f}, {g['max']:.3f}]"
        blocks = s["blocks"]

        def each(key: str, fmt: str, blocks: list = blocks) -> str:
            return " / ".join(format(b[key], fmt) for b in blocks) or "-"

        norms = " / ".join(
            f"{b['last_layer_norm_by_segment'][0]:.2f}→{b['last_layer_norm_by_segment'][-1]:.2f}"
            for b in blocks
        )
        lines.append(
            f"| {kind} | {gain} | {s['first_gradient_reach']:.2g} | {each('alpha', '.5f')} | "
            f"{each('theta', '.4f')} | {each('eta', '.3f')} | {norms or '-'} |"
        )
    return "\n".join(lines)
