"""Probe: why does pass-key recall collapse beyond the training length L?

Two measurements on pass-key examples built like ``titans_train.synthetic``'s (the same needle,
question and repeated noise haystack), but with the needle placed a chosen number of filler
tokens before the question, on a checkpoint (``--checkpoint RUN_DIR``) or a fresh tiny model
(``--variant``). The model is fed ``--piece`` tokens at a time with its state carried (default:
the trained seq_len), as ``titans-eval`` does.

1. ``recall``: a grid of total length x *distance* (filler tokens between the needle and the
   question). Per cell: greedy exact match, the share of answer tokens predicted, and the mean
   log-probability of the answer tokens. A row (fixed distance, growing length) isolates the
   effect of position / how much was written before the needle; a column (fixed length, growing
   distance) isolates the filler written after the needle.
2. ``writes``: every memory write, replayed from the logged write inputs and states with the
   module's own projections, gates and chunk semantics (gradients at the chunk-start weights).
   Per token and memory layer: theta, eta, alpha (mean over heads), the inner loss
   1/2 ||M(k) - v||^2 and the norm of its gradient over all memory layers (each layer's gradient
   is the outer product a^T delta, so its norm is |a| |delta|), and the write size theta * |u|.
   Averaged per token class: the needle's value digits, the rest of the needle, the filler by
   *pass* (the noise paragraph's first occurrence, its second, third, later ones: a memory that
   has learned the paragraph writes its repeats with small surprise) and the question; and per
   position bin. Per example: the needle's total write, the weight it keeps until the question
   (the product of 1 - alpha after it) and the total filler write after it.

    python benchmarks/probe_length.py --checkpoint runs/len/base_mag/mag --out probe.json
    python benchmarks/probe_length.py --smoke        # a fresh MAG, seconds (CI)

Findings: docs/results.md, "Beyond the training length: why recall collapses, and what fixes it".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from titans_train.models import ModelConfig, TitansLM
from titans_train.models.memory import causal_conv
from titans_train.models.memory_math import mlp_deltas, mlp_forward
from titans_train.perplexity import stream_logits
from titans_train.synthetic import NOISE, _assemble, _haystack, example_rng

CLASSES = ("value", "needle", "filler0", "filler1", "filler2", "filler3+", "question")
POS_BINS = (0, 128, 256, 512, 1024, 2048, 4096)


def encode(s: str) -> list[int]:
    return list(s.encode())


def passkey_at(length: int, distance: int, index: int, seed: int = 0) -> dict:
    """A pass-key example of ``length`` tokens with ``distance`` filler tokens between the needle
    and the question; ``classes`` labels every token (CLASSES), ``answer`` is its [a, b) span."""
    rng = example_rng("probe_length", length, seed, index)
    value = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {value}. Remember it. {value} is the pass key. "
    query = "\nWhat is the pass key? The pass key is"
    room = length - len(encode(needle)) - len(encode(query)) - len(encode(" " + value))
    if not 0 <= distance <= room:
        raise ValueError(f"distance {distance} does not fit in {length} tokens (room {room})")
    hay = [t for s in _haystack(rng, "noise", room, encode) for t in s]
    before, after = hay[: room - distance], hay[room - distance :]
    pieces = [(before, False), (needle, False), (after, False), (query, False)]
    tokens, answers = _assemble(pieces + [(" " + value, True)], encode)
    period = len(encode(NOISE))
    classes = [f"filler{min(i // period, 3)}" for i in range(len(hay))]
    classes = [c if c != "filler3" else "filler3+" for c in classes]
    n = len(encode(needle))
    nd = ["value" if needle[i].isdigit() else "needle" for i in range(n)]
    q = len(encode(query)) + len(encode(" " + value))
    labels = classes[: len(before)] + nd + classes[len(before) :] + ["question"] * q
    start = len(before)
    return dict(tokens=tokens, answer=answers[0], classes=labels, needle=(start, start + n))


def answer_scores(logits: torch.Tensor, examples: list[dict]) -> dict:
    """Exact match %, answer tokens %, and mean answer-token log-prob over the examples."""
    tokens = torch.tensor([e["tokens"] for e in examples])
    logp = F.log_softmax(logits.float(), -1)
    exact, share, lp = [], [], []
    for row, e in enumerate(examples):
        a, b = e["answer"]
        target = tokens[row, a:b]
        hit = logp[row, a - 1 : b - 1].argmax(-1) == target
        exact.append(float(hit.all()))
        share.append(hit.float().mean().item())
        lp.append(logp[row, a - 1 : b - 1].gather(-1, target[:, None]).mean().item())
    n = len(examples)
    return dict(exact=100 * sum(exact) / n, tokens=100 * sum(share) / n, logp=sum(lp) / n)


class WriteLog:
    """Wraps every block's memory.forward to log its writes: (input x, state before)."""

    def __init__(self, model: TitansLM):
        self.calls: dict[int, list] = {}
        self.memories = {}
        for l, block in enumerate(model.blocks):
            memory = getattr(block, "memory", None)
            if memory is None:
                continue
            self.memories[l] = memory
            forward = memory.forward

            def logged(x, state=None, read_only=False, _l=l, _f=forward, **kw):
                if not read_only:
                    if any(v is not None for v in kw.values()):
                        raise ValueError("probe_length: documents / prefixes are not supported")
                    self.calls.setdefault(_l, []).append((x.detach(), state))
                return _f(x, state, read_only=read_only, **kw)

            memory.forward = logged

    def close(self) -> None:
        for memory in self.memories.values():
            del memory.forward


@torch.no_grad()
def replay(memory, x: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """Per token of one write call [B, T]: gates, inner loss, gradient norm (mean over heads)."""
    B, T, _ = x.shape
    n = memory.chunk_size
    out: dict[str, list] = {k: [] for k in ("theta", "eta", "alpha", "loss", "grad", "drift")}
    m0 = memory._initial(B)[0]
    m0_norm = torch.sqrt(sum(w.pow(2).sum((-1, -2)) for w in m0))  # [B*H]
    for a in range(0, T, n):
        xc = x[:, a : a + n]
        qkv, _ = causal_conv(
            F.linear(xc, memory.w_qkv), memory.conv, state.conv_tail if state else None
        )
        _, k, v = memory._qkv_heads(qkv)
        theta, log_eta, log_keep = (g.mean(-1) for g in memory._gates(xc))  # [B*H, n]
        fresh = state is None or state.weights is None
        weights = memory._initial(B)[0] if fresh else state.weights
        # how far the chunk-start weights have moved from M_0, relative to |M_0|
        gap = torch.sqrt(sum((w - w0).pow(2).sum((-1, -2)) for w, w0 in zip(weights, m0)))
        drift = (gap / m0_norm)[:, None].expand(-1, xc.shape[1])
        pred, acts, pres = mlp_forward(weights, k, memory.residual_norm)
        err = pred - v
        deltas = mlp_deltas(weights, pres, err, memory.residual_norm)
        grad2 = sum((a_.norm(dim=-1) * d_.norm(dim=-1)) ** 2 for a_, d_ in zip(acts, deltas))
        per = dict(
            theta=theta, eta=log_eta.exp(), alpha=1 - log_keep.exp(),
            loss=0.5 * err.pow(2).sum(-1), grad=grad2.sqrt(), drift=drift,
        )  # fmt: skip
        for key, val in per.items():  # [B*H, n] -> [B, n], mean over heads
            out[key].append(val.view(B, memory.heads, -1).mean(1))
        state = memory.forward(xc, state)[1]
    return {k: torch.cat(v, 1) for k, v in out.items()}


def write_records(
    model: TitansLM, examples: list[dict], piece: int
) -> tuple[torch.Tensor, dict[int, dict]]:
    """The logits and {layer: {quantity: [B, T]}} of the examples' forward (``piece`` tokens per
    call, the state carried)."""
    log = WriteLog(model)
    try:
        tokens = torch.tensor([e["tokens"] for e in examples])
        logits = torch.cat([lg for _, lg in stream_logits(model, tokens, piece)], 1)
    finally:
        log.close()
    rec = {}
    T = tokens.shape[1]
    for l, calls in log.calls.items():
        # one stream's writes are consecutive: replayed as one call from the first call's state
        # (streaming equals one call), so chunk boundaries fall where the model put them
        if calls[0][1] is not None:
            raise ValueError("probe_length: the first write must start from a fresh memory")
        x = torch.cat([c[0] for c in calls], 1)
        q = replay(log.memories[l], x, None)
        rec[l] = {k: v[:, x.shape[1] - T :] for k, v in q.items()}  # persistent tokens off
        rec[l]["write"] = rec[l]["theta"] * rec[l]["grad"]
    return logits, rec


def needle_fate(q: dict, examples: list[dict]) -> dict:
    """Mean over examples: the needle's total write, the filler's total write between it and the
    answer, the share of the needle's write kept until the answer (prod of 1 - alpha), and the
    memory's drift |M - M_0| / |M_0| where the needle is written."""
    fate = []
    for row, e in enumerate(examples):
        s, t = e["needle"]
        a = e["answer"][0]
        log_keep = torch.log1p(-q["alpha"][row, t:a].clamp(max=1 - 1e-7)).sum()
        fate.append(
            dict(
                needle_write=q["write"][row, s:t].sum().item(),
                after_write=q["write"][row, t : a - 1].sum().item(),
                keep=log_keep.exp().item(),
                drift=q["drift"][row, s].item(),
            )
        )
    return {k: sum(f[k] for f in fate) / len(fate) for k in fate[0]}


def summarise_writes(rec: dict[int, dict], examples: list[dict]) -> dict:
    """Means per layer by token class and position bin, and the needle's fate per example."""
    out = {}
    for l, q in rec.items():
        T = q["theta"].shape[1]
        labels = [e["classes"] for e in examples]
        by_class = {}
        for c in CLASSES:
            mask = torch.tensor([[lab[t] == c for t in range(T)] for lab in labels])
            if mask.any():
                by_class[c] = {k: v[mask].mean().item() for k, v in q.items()}
                by_class[c]["count"] = int(mask.sum())
        by_pos = {}
        for lo, hi in zip(POS_BINS[:-1], POS_BINS[1:]):
            if lo >= T:
                break
            by_pos[f"{lo}-{min(hi, T)}"] = {k: v[:, lo:hi].mean().item() for k, v in q.items()}
        mean_fate = needle_fate(q, examples)
        out[str(l)] = dict(by_class=by_class, by_position=by_pos, needle=mean_fate)
    return out


def run(model: TitansLM, lengths: list[int], distances: list[int], count: int, piece: int,
        seed: int, writes_too: bool = True, before: dict | None = None) -> dict:  # fmt: skip
    """``before`` ({"alpha": a, "theta": t}): scale the gates of the tokens before the needle
    (in the recall grid, whose cells each have one needle position; no write records then)."""
    recall: dict = {}
    for length in lengths:
        for d in distances:
            try:
                exs = [passkey_at(length, d, i, seed) for i in range(count)]
            except ValueError:
                continue
            if before:
                restore = scale_gates(model, **before, until=exs[0]["needle"][0])
                tokens = torch.tensor([e["tokens"] for e in exs])
                logits = torch.cat([lg for _, lg in stream_logits(model, tokens, piece)], 1)
                restore()
                recall.setdefault(str(length), {})[str(d)] = answer_scores(logits, exs)
                continue
            logits, rec = write_records(model, exs, piece)
            cell = answer_scores(logits, exs)
            cell["fate"] = {str(l): needle_fate(q, exs) for l, q in rec.items()}
            recall.setdefault(str(length), {})[str(d)] = cell
    writes = {}
    for length in lengths if writes_too and not before else []:
        # the needle at a random distance over the whole haystack (far and near alike)
        room = passkey_room(length)
        rng = random.Random(f"probe_length:writes:{length}:{seed}")
        exs = [passkey_at(length, rng.randrange(room + 1), i, seed) for i in range(count)]
        writes[str(length)] = summarise_writes(write_records(model, exs, piece)[1], exs)
    return dict(recall=recall, writes=writes)


def passkey_room(length: int) -> int:
    fixed = len(encode("The pass key is 12345. Remember it. 12345 is the pass key. "))
    return length - fixed - len(encode("\nWhat is the pass key? The pass key is 12345"))


def tables(report: dict) -> str:
    """Markdown: the recall grid and, per layer, the writes by class at each length."""
    rec = report["recall"]
    lengths = list(rec)
    dists = sorted({int(d) for row in rec.values() for d in row})
    lines = ["distance \\ length | " + " | ".join(lengths), "|".join(["---"] * (len(lengths) + 1))]
    for d in dists:
        cells = []
        for L in lengths:
            c = rec[L].get(str(d))
            cells.append(
                "–" if c is None else f"{c['exact']:.0f} ({c['tokens']:.0f}) {c['logp']:.2f}"
            )
        lines.append(f"{d} | " + " | ".join(cells))
    lines += [
        "",
        "needle kept until the answer, per memory block; filler write after it / needle write",
    ]
    lines += ["distance \\ length | " + " | ".join(lengths), "|".join(["---"] * (len(lengths) + 1))]
    for d in dists:
        cells = []
        for L in lengths:
            c = rec[L].get(str(d))
            if c is None or "fate" not in c:
                cells.append("–")
                continue
            f = c["fate"].values()
            keep = " / ".join(f"{x['keep']:.2f}" for x in f)
            ratio = " / ".join(f"{x['after_write'] / max(x['needle_write'], 1e-9):.1f}" for x in f)
            drift = " / ".join(f"{x['drift']:.2f}" for x in f)
            cells.append(f"{keep}; {ratio}; {drift}")
        lines.append(f"{d} | " + " | ".join(cells))
    for L, per_layer in report["writes"].items():
        for l, w in per_layer.items():
            lines += ["", f"length {L}, memory of block {l}: needle {w['needle']}"]
            lines.append("class | theta | eta | alpha | loss | grad | write | drift | count")
            lines.append("---|---|---|---|---|---|---|---|---")
            for c, v in w["by_class"].items():
                lines.append(
                    f"{c} | {v['theta']:.4f} | {v['eta']:.3f} | {v['alpha']:.5f} | "
                    f"{v['loss']:.3f} | {v['grad']:.3f} | {v['write']:.4f} | {v['drift']:.3f} | "
                    f"{v['count']}"
                )
            for p, v in w["by_position"].items():
                lines.append(
                    f"pos {p} | {v['theta']:.4f} | {v['eta']:.3f} | {v['alpha']:.5f} | "
                    f"{v['loss']:.3f} | {v['grad']:.3f} | {v['write']:.4f} | {v['drift']:.3f} |"
                )
    return "\n".join(lines)


def scale_gates(model: TitansLM, alpha: float = 1.0, theta: float = 1.0, until: int | None = None):
    """Evaluation-time intervention: every memory forgets with alpha * ``alpha`` and writes with
    theta * ``theta`` (a counterfactual on the trained model: is it the forgetting or the writing
    that loses the needle beyond L?); if ``until`` is given, on the sequence's tokens before it
    only (not on the persistent tokens written first). Returns a function that undoes it."""
    n_p = 0 if model.cfg.variant == "mac" else model.cfg.num_persistent  # written first
    undo = []
    for block in model.blocks:
        memory = getattr(block, "memory", None)
        if memory is None or (alpha == 1.0 and theta == 1.0):
            continue
        gates, forward, pos = memory._gates, memory.forward, [0]

        def counted(x, state=None, read_only=False, _f=forward, _pos=pos, **kw):
            if not read_only and state is None:
                _pos[0] = -n_p  # a new stream: the persistent tokens come before position 0
            return _f(x, state, read_only=read_only, **kw)

        def scaled(x, _g=gates, _pos=pos):
            th, log_eta, log_keep = _g(x)
            at = torch.arange(_pos[0], _pos[0] + x.shape[1], device=x.device)[None, :, None]
            _pos[0] += x.shape[1]
            hit = (at >= 0) & (at < until) if until is not None else torch.ones_like(at) > 0
            keep = torch.log1p(-alpha * (1 - log_keep.exp()))
            return torch.where(hit, th * theta, th), log_eta, torch.where(hit, keep, log_keep)

        memory._gates, memory.forward = scaled, counted
        undo.append(memory)

    def restore() -> None:
        for memory in undo:
            del memory._gates, memory.forward

    return restore


def load(args: argparse.Namespace) -> tuple[TitansLM, int]:
    if args.checkpoint:
        from titans_train.load import open_checkpoint

        ckpt = open_checkpoint(args.checkpoint)
        piece = args.piece or ckpt.config.get("train", {}).get("seq_len") or 128
        return ckpt.model().eval(), piece
    cfg = dict(
        vocab_size=320, dim=64, depth=2, heads=4, window=16, segment_len=16, chunk_size=16,
        num_persistent=4, memory_depth=2, variant=args.variant,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return TitansLM(ModelConfig(**cfg)).eval(), args.piece or 128


@torch.no_grad()  # not set_grad_enabled: tests call main() in their own process
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a run dir, step dir or export (else a fresh model)")
    ap.add_argument("--variant", default="mag", help="fresh model: mac, mag, mal or lmm")
    ap.add_argument("--lengths", default="128,256,512,1024")
    ap.add_argument("--distances", default="8,24,56,120,248,504,1016",
                    help="filler tokens between the needle and the question")  # fmt: skip
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--no-writes", action="store_true", help="the recall grid only")
    ap.add_argument("--piece", type=int, help="tokens per forward (default: trained seq_len)")
    ap.add_argument("--alpha-scale", type=float, default=1.0, help="intervention: alpha x this")
    ap.add_argument("--theta-scale", type=float, default=1.0, help="intervention: theta x this")
    ap.add_argument(
        "--before-needle",
        action="store_true",
        help="apply --alpha-scale/--theta-scale to the tokens before the needle only",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--smoke", action="store_true", help="a fresh MAG, 2 examples, 2 lengths")
    args = ap.parse_args(argv)
    if args.smoke:
        args.checkpoint, args.examples, args.lengths, args.distances = None, 2, "128,256", "8,120"
    model, piece = load(args)
    scales = dict(alpha=args.alpha_scale, theta=args.theta_scale)
    before = scales if args.before_needle else None
    if not before:
        scale_gates(model, **scales)
    lengths = [int(x) for x in args.lengths.split(",")]
    distances = [int(x) for x in args.distances.split(",")]
    report = dict(args=vars(args), piece=piece)
    report.update(
        run(model, lengths, distances, args.examples, piece, args.seed, not args.no_writes, before)
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(tables(report))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
