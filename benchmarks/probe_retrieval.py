"""Probe: does a Titans memory retrieve the pass key at the question, and what reaches the memory?

Three measurements on pass-key examples (``titans_train.synthetic``), fp64, eval mode, on a
fresh model (``--variant``, the tiny model of probe_mac.py at ``--segment``) or on a checkpoint
(``--checkpoint RUN_DIR``):

1. ``attention``: MAC only. The softmax mass each query puts on the persistent tokens, on the
   retrieved tokens h and on the segment's own keys, per layer, at the *question* positions (the
   tokens whose logits predict the answer) and over all positions.
2. ``needle``: every memory variant. The read M_prev(q_t) at the question, with M_prev the
   memory at the start of the question's segment (what MAC retrieves; for MAG/MAL/LMM the same
   read-only view), against the values v_s the memory wrote at the needle's value tokens. Each
   example A is paired with B, the same text with another pass key in the needle only, so the
   question's tokens, and its queries, are the same. ``signal`` = mean over question positions
   and heads of max_s cos(M_prev^A(q_t), v_s^A) minus the same with M_prev^B: > 0 iff the read
   carries A's needle. ``read_change`` = |M^A(q_t) - M^B(q_t)| / |M^A(q_t)| (how much the read
   depends on the needle's pass key at all) and ``change_along_values`` = max_s cos(M^A(q_t) -
   M^B(q_t), v_s^A - v_s^B) (whether that change points along the written values' change; a
   max over the needle's value tokens, so compare it between models, not with 0).
   Binned by the number of segment boundaries between the needle and the
   question (1, 2, ..., 5, 6+; at segment 16 the pass-key text puts >= 3 between them).
3. ``gradient``: the answer loss (cross entropy on the answer tokens only) backpropagated; the
   gradient norm of each memory's w_qkv (q, k, v rows), its gates (to_gates), M_0 and of the
   attention's qkv, and the gradient reaching the memory's *write input* at the needle's value
   tokens over that at the question's own segment (credit assignment to the needle's write).

    python benchmarks/probe_retrieval.py --variant mac --out runs/retrieval_mac.json
    python benchmarks/probe_retrieval.py --checkpoint runs/study/mac --examples 16
    python benchmarks/probe_retrieval.py --smoke --out smoke.json   # seconds (CI)

Findings: docs/results.md, "Why MAC does not recall: its write depends on its own read".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_mac as P  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402
from titans_train.models.attention.rules import (  # noqa: E402  # noqa: E402
    KeyGroup,
    Visible,
    concat_groups,
    dense_mask,
    key_layout,
)
from titans_train.models.memory import causal_conv  # noqa: E402
from titans_train.models.memory_math import mlp_forward  # noqa: E402
from titans_train.synthetic import generate  # noqa: E402

# Boundaries between the needle's last value token and the question: with the pass-key text
# (" is the pass key. " and the question follow the value) there are >= 3 at segment 16.
BINS = ("1", "2", "3", "4", "5", "6+")


def byte_encode(s: str) -> list[int]:
    return list(s.encode())


def passkey_pairs(length: int, count: int, seed: int, encode=byte_encode) -> list[dict]:
    """Examples A with a twin B (another 5-digit key in the needle only; same token count)."""
    out = []
    for ex in generate("passkey", length, count, encode, seed=seed, depth=(0.0, 1.0)):
        (a0, a1), value = ex.answers[0], ex.needles[0][1]
        ids = encode(value)
        other = encode(str(10_000 + (int(value) + 43_210) % 90_000))
        toks = list(ex.tokens)
        spots = [s for s in range(a0 - len(ids)) if toks[s : s + len(ids)] == ids]
        if len(other) != len(ids) or not spots:
            continue
        twin = list(toks)
        for s in spots:
            twin[s : s + len(ids)] = other
        needle = [s + i for s in spots for i in range(len(ids))]
        out.append(dict(a=toks, b=twin, answer=(a0, a1), needle=needle))
    return out


def attention_weights(
    q: torch.Tensor, q_nope: torch.Tensor, groups: list[KeyGroup]
) -> torch.Tensor:
    """The softmax weights [B, H, T, S] of ``attend`` over the groups' concatenated keys."""
    qq, kk, _ = concat_groups(q, groups, q_nope)
    if not any(isinstance(g.rule, Visible) for g in groups):
        qq = q
    s = (qq @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = dense_mask(key_layout(groups), q.shape[-2], q.device)
    return s.masked_fill(~mask, float("-inf")).softmax(-1)


class Recorder:
    """Wraps each block's memory and (MAC) attention to log what one forward does: the block's
    memory writes (input x, conv tail before the call), and the attention mass per key group."""

    def __init__(self, model: TitansLM):
        self.model, self.writes, self.reads, self.masses, self.undo = model, {}, {}, {}, []
        for l, block in enumerate(model.blocks):
            if getattr(block, "memory", None) is not None:
                self._wrap_memory(l, block.memory)
            if type(block).__name__ == "MACBlock":
                self._wrap_attend(l, block)

    def _wrap_memory(self, l: int, memory) -> None:
        forward = memory.forward

        def logged(x, state=None, read_only=False, **kw):
            if not read_only:
                tail = None if state is None else state.conv_tail
                self.writes.setdefault(l, []).append((x, tail))
            out = forward(x, state, read_only=read_only, **kw)
            if read_only:
                self.reads.setdefault(l, []).append(out[0])
            return out

        memory.forward = logged
        self.undo.append(lambda: delattr(memory, "forward"))

    def _wrap_attend(self, l: int, block) -> None:
        attn, attend = block.attn, block.attn.attend
        n_p = 0 if block.persistent is None else 1

        def logged(q, q_nope, groups: list[KeyGroup]):
            with torch.no_grad():
                w = attention_weights(q, q_nope, groups)
                sizes = [g.k.shape[-2] for g in groups]
                parts = [p.sum(-1) for p in w.split(sizes, dim=-1)]  # each [B, H, T]
                mass = dict(persistent=parts[0] if n_p else torch.zeros_like(parts[0]))
                mass.update(h=parts[n_p], segment=sum(parts[n_p + 1 :]))
            self.masses.setdefault(l, []).append(mass)
            return attend(q, q_nope, groups)

        attn.attend = logged
        self.undo.append(lambda: delattr(attn, "attend"))

    def clear(self) -> None:
        self.writes.clear()
        self.reads.clear()
        self.masses.clear()

    def close(self) -> None:
        for u in self.undo:
            u()


def attention_mass(rec: Recorder, question: list[int]) -> list[dict]:
    """Per MAC layer: mean mass on P, h and the segment, at the question and overall."""
    rows = []
    for l, calls in sorted(rec.masses.items()):
        row: dict = dict(layer=l)
        for key in ("persistent", "h", "segment"):
            full = torch.cat([c[key] for c in calls], dim=-1)  # [B, H, T]
            row[key + "_question"] = float(full[..., question].mean())
            row[key + "_all"] = float(full.mean())
        rows.append(row)
    return rows


def values_written(memory, writes: list, n_prefix: int) -> torch.Tensor:
    """v of every written sequence token, [B, H, T, d] (the persistent prefix dropped)."""
    x = torch.cat([w[0] for w in writes], dim=1)
    D = memory.dim
    vc, _ = causal_conv(F.linear(x, memory.w_qkv[2 * D :]), memory.conv[2 * D :], writes[0][1])
    v = F.silu(vc)[:, n_prefix:]
    B, T, _ = v.shape
    return v.view(B, T, memory.heads, -1).transpose(1, 2)


@torch.no_grad()
def reads_and_values(model: TitansLM, tokens: torch.Tensor, seg: int, rec: Recorder) -> dict:
    """Stream the tokens segment by segment; per memory layer the segment-start weights' reads
    M_prev(q_t) [B, H, T, d] at every token and the values v written, [B, H, T, d]."""
    inputs: dict = {}
    hooks = [
        b.register_forward_pre_hook(lambda _m, a, l=l: inputs.setdefault(l, []).append(a[0]))
        for l, b in enumerate(model.blocks)
    ]
    rec.clear()
    st, starts = None, []
    try:
        for i in range(0, tokens.shape[1], seg):
            starts.append(None if st is None else [bs.mem for bs in st.blocks])
            st = model(tokens[:, i : i + seg], state=st).state
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for l, block in enumerate(model.blocks):
        mem = getattr(block, "memory", None)
        if mem is None:
            continue
        xn = block.norm1(torch.cat(inputs[l], dim=1))
        D, B = mem.dim, xn.shape[0]
        qc, _ = causal_conv(F.linear(xn, mem.w_qkv[:D]), mem.conv[:D], None)
        q = F.normalize(mem._heads(F.silu(qc)), dim=-1)  # [B*H, T, d]
        reads = []
        for i, s in enumerate(starts):
            w = mem._initial(B)[0] if s is None or s[l] is None else s[l].weights
            reads.append(mlp_forward(w, q[:, i * seg : (i + 1) * seg], mem.residual_norm)[0])
        r = torch.cat(reads, dim=1)
        first = rec.writes[l][0][0].shape[1] - min(seg, tokens.shape[1])  # MAG/MAL/LMM: P first
        out[l] = dict(
            read=r.view(B, mem.heads, *r.shape[1:]), v=values_written(mem, rec.writes[l], first)
        )
    return out


def needle_signal(model: TitansLM, pairs: list[dict], seg: int) -> dict:
    """``signal`` per layer and bin of segment boundaries (module doc, item 2)."""
    rec = Recorder(model)
    acc: dict = {}
    try:
        for p in pairs:
            a0, a1 = p["answer"]
            question = list(range(a0 - 1, a1 - 1))
            n = (a0 - 1) // seg - max(p["needle"]) // seg
            if n < 1:
                continue  # the needle is in the question's own segment: not a memory read
            b = BINS[min(n, len(BINS)) - 1]
            ra = reads_and_values(model, torch.tensor([p["a"]]), seg, rec)
            rb = reads_and_values(model, torch.tensor([p["b"]]), seg, rec)
            for l in ra:
                v = F.normalize(ra[l]["v"][:, :, p["needle"]], dim=-1)  # A's needle values
                cos = []
                for r in (ra[l]["read"], rb[l]["read"]):
                    h = F.normalize(r[:, :, question], dim=-1)
                    cos.append(float((h @ v.transpose(-1, -2)).amax(-1).mean()))
                dh = ra[l]["read"][:, :, question] - rb[l]["read"][:, :, question]
                dv = ra[l]["v"][:, :, p["needle"]] - rb[l]["v"][:, :, p["needle"]]
                cos.append(
                    float((dh.norm(dim=-1) / ra[l]["read"][:, :, question].norm(dim=-1)).mean())
                )
                dh, dv = F.normalize(dh, dim=-1), F.normalize(dv, dim=-1)
                cos.append(float((dh @ dv.transpose(-1, -2)).amax(-1).mean()))
                acc.setdefault(l, {}).setdefault(b, []).append(cos)
    finally:
        rec.close()
    out = {}
    for l, bins in acc.items():
        out[l] = {}
        for b, cs in bins.items():
            ca, cb, moved, along = (sum(c[i] for c in cs) / len(cs) for i in range(4))
            out[l][b] = dict(n=len(cs), cos_a=ca, cos_b=cb, signal=ca - cb)
            out[l][b].update(read_change=moved, change_along_values=along)
    return out


def attention_probe(model: TitansLM, pairs: list[dict]) -> list[dict]:
    """``attention_mass`` averaged over the examples (MAC only; [] otherwise)."""
    rec, rows = Recorder(model), []
    try:
        for p in pairs:
            rec.clear()
            with torch.no_grad():
                model(torch.tensor([p["a"]]))
            a0, a1 = p["answer"]
            rows.append(attention_mass(rec, list(range(a0 - 1, a1 - 1))))
    finally:
        rec.close()
    if not rows or not rows[0]:
        return []
    return [
        {k: sum(r[i][k] for r in rows) / len(rows) for k in rows[0][i] if k != "layer"}
        | {"layer": rows[0][i]["layer"]}
        for i in range(len(rows[0]))
    ]


def gradient_probe(model: TitansLM, pairs: list[dict], seg: int) -> list[dict]:
    """Per memory layer: gradient norms of the answer loss (module doc, item 3), summed over
    the examples' losses (mean cross entropy over each example's answer tokens)."""
    model.zero_grad(set_to_none=True)
    rec, ratios = Recorder(model), {}
    try:
        for p in pairs:
            rec.clear()
            tokens = torch.tensor([p["a"]])
            a0, a1 = p["answer"]
            logits = model(tokens).logits[0, a0 - 1 : a1 - 1]
            loss = F.cross_entropy(logits, tokens[0, a0:a1])
            xs = {l: [w[0] for w in ws] for l, ws in rec.writes.items()}
            grads = torch.autograd.grad(
                loss, [x for ws in xs.values() for x in ws], retain_graph=True
            )
            it = iter(grads)
            for l, ws in xs.items():
                g = torch.cat([next(it) for _ in ws], dim=1)[0]
                g = g[g.shape[0] - len(p["a"]) :].norm(dim=-1)  # per sequence token
                q0 = (a0 - 1) // seg * seg
                own = float(g[q0:a1].mean())
                ratios.setdefault(l, []).append(float(g[p["needle"]].mean()) / max(own, 1e-300))
            loss.backward()
    finally:
        rec.close()
    rows = []
    for l, block in enumerate(model.blocks):
        mem = getattr(block, "memory", None)
        if mem is None:
            continue
        D, gw = mem.dim, mem.w_qkv.grad
        row = dict(layer=l, w_q=float(gw[:D].norm()), w_k=float(gw[D : 2 * D].norm()))
        row.update(w_v=float(gw[2 * D :].norm()), gates=float(mem.to_gates.weight.grad.norm()))
        row["gate_bias"] = [float(t.norm()) for t in mem.to_gates.bias.grad.view(3, -1)]
        row["m0"] = math.sqrt(sum(float(w.grad.pow(2).sum()) for w in mem.init_weights))
        row["attn_qkv"] = float(block.attn.qkv.weight.grad.norm())
        rs = sorted(ratios.get(l, [float("nan")]))
        row["needle_over_question_write_grad"] = rs[len(rs) // 2]
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def fresh_model(variant: str, seg: int, seed: int, **overrides) -> TitansLM:
    cfg = dict(P.BASE, variant=variant, segment_len=seg, window=seg, num_memory_tokens=8)
    cfg.update(chunk_size=min(P.BASE["chunk_size"], seg), **overrides)
    torch.manual_seed(seed)
    return TitansLM(ModelConfig(**cfg)).to(P.DT).eval()


def run(model: TitansLM, seg: int, length: int, examples: int, seed: int) -> dict:
    pairs = passkey_pairs(length, examples, seed)
    return dict(
        attention=attention_probe(model, pairs),
        needle=needle_signal(model, pairs, seg),
        gradient=gradient_probe(model, pairs, seg),
        examples=len(pairs),
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a run dir, step dir or export (else a fresh model)")
    ap.add_argument("--variant", default="mac", help="fresh model: mac, mag, mal or lmm")
    ap.add_argument("--set", nargs="*", default=[], help="fresh model: ModelConfig key=value")
    ap.add_argument("--segment", type=int, default=16, help="fresh model: MAC segment and window")
    ap.add_argument("--length", type=int, default=256, help="tokens per pass-key example")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON here (default: stdout)")
    ap.add_argument("--smoke", action="store_true", help="a fresh MAC, 1 example of 128 tokens")
    args = ap.parse_args(argv)
    if args.smoke:
        args.checkpoint, args.variant, args.examples, args.length = None, "mac", 1, 128
    if args.checkpoint:
        from titans_train.load import open_checkpoint

        ckpt = open_checkpoint(args.checkpoint)
        model, seg = ckpt.model().to(P.DT).eval(), ckpt.model_config.segment_len
        cfg = ckpt.model_config.to_dict()
    else:
        kw = {}
        for item in args.set:
            key, _, val = item.partition("=")
            kw[key] = json.loads(val) if val[:1] in "-0123456789tfn[" else val
        model, seg = fresh_model(args.variant, args.segment, args.seed, **kw), args.segment
        cfg = model.cfg.to_dict() if hasattr(model, "cfg") else {}
    report = dict(
        args=vars(args), config=cfg, **run(model, seg, args.length, args.examples, args.seed)
    )
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return report


if __name__ == "__main__":
    main()
