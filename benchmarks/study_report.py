"""docs/results.md, its plots and its copy results.json from a study.json (study.py's).

python benchmarks/study_report.py [runs/study/study.json] [--out docs]
python benchmarks/study_report.py docs/results.json --out docs   # redraw from the kept copy
python benchmarks/study_report.py --smoke --out DIR   # docs/results_v1.json redrawn in DIR (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECALL = ("passkey", "number", "uuid", "mqar")
NAMES = {
    "mac": "MAC",
    "mag": "MAG",
    "mal": "MAL",
    "lmm": "LMM",
    "transformer": "Transformer++ (SWA)",
    "full-attention": "Transformer++, full attention (control)",
    "full-attention-conv": "Transformer++, full attention, token conv 4 (control)",
    "mac-input": "MAC, writes its input",
    "mac-memtok": "MAC, memory tokens",
    "mac-stopgrad": "MAC, no gradient through its write",
    "mac-input-memtok": "MAC, writes its input, memory tokens",
}
# The model shape of studies recorded before study.json named it (study.py's MODEL back then).
OLD_MODEL = dict(
    vocab_size=320, dim=64, depth=2, heads=4, window=16, segment_len=16, chunk_size=16,
    num_persistent=4, memory_depth=2,
)  # fmt: skip
# What follows this heading in results.md is written by hand and kept when the page is redrawn.
NOTES = "## What we see, and why"


def _pct(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{100 * r['accuracy']:.0f} ({100 * r['token_accuracy']:.0f})"


def _minutes(m: dict, key: str) -> str:
    """Minutes, or – when not timed (not recorded, or 0: trained by an earlier, stopped run)."""
    return f"{m[key] / 60:.1f}" if m.get(key) else "–"


def _length(n: int, seq_len: int) -> str:
    """A column label: the length, and its multiple of the training length L."""
    f = n / seq_len
    return f"{n} ({'' if f == 1 else f'{f:g}'}L)"


def table(report: dict) -> str:
    """One table of size, loss, perplexity and time; one per recall suite: near, then far by
    length (L = the training length)."""
    models, seq_len = report["models"], int(report["args"]["seq_len"])
    lengths = sorted({int(n) for m in models.values() for n in m["far"].get("ppl", {})})
    cols = " | ".join(f"ppl {_length(n, seq_len)}" for n in lengths)
    head = f"| model | params | SwiGLU | val loss | {cols} | train min | eval min |"
    lines = [head, "|---" * (6 + len(lengths)) + "|"]
    for v, m in models.items():
        ppl = m["far"].get("ppl", {})
        cells = " | ".join(f"{ppl[str(n)]['ppl']:.2f}" if str(n) in ppl else "–" for n in lengths)
        val = "–" if m["val_loss"] is None else f"{m['val_loss']:.3f}"
        size = f"{m['params']:,} | {m['ffn_hidden']}"
        time = f"{_minutes(m, 'train_seconds')} | {_minutes(m, 'eval_seconds')}"
        lines.append(f"| {NAMES.get(v, v)} | {size} | {val} | {cells} | {time} |")
    for suite in RECALL:
        lens = sorted({int(n) for m in models.values() for n in m["far"].get(suite, {})})
        if not lens:
            continue
        cols = " | ".join(f"far {_length(n, seq_len)}" for n in lens)
        lines += ["", f"**{suite}**", "", f"| model | near {lens[0]} | {cols} |"]
        lines.append("|---" * (2 + len(lens)) + "|")
        for v, m in models.items():
            near = next(iter(m["near"].get(suite, {}).values()), None)
            far = " | ".join(_pct(m["far"].get(suite, {}).get(str(n))) for n in lens)
            lines.append(f"| {NAMES.get(v, v)} | {_pct(near)} | {far} |")
    return "\n".join(lines)


def _lines(ax, models: dict, per_model, ylabel: str) -> None:
    """One line per model of per_model(m) -> {length: [(y, style)]}, colours kept per model."""
    for i, (v, m) in enumerate(models.items()):
        colour = f"C{i % 10}"
        for style, label, series in per_model(m):
            xs = sorted(series)
            ax.plot(xs, [series[x] for x in xs], style, color=colour, label=label(v))
    ax.set(xlabel="evaluation length (tokens)", ylabel=ylabel, xscale="log")
    xs = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xticks(xs, [str(int(x)) for x in xs])
    ax.minorticks_off()


def plots(report: dict, docs: Path) -> list[str]:
    """study_loss.png (training loss), study_recall.png (per suite: exact match solid, answer
    tokens dashed, against evaluation length: the shape of the paper's Table 2) and
    study_ppl.png (held-out perplexity against evaluation length, state carried)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, m in models.items():
        ax.plot(m["loss_steps"], m["loss"], label=NAMES.get(v, v))
    ax.set(xlabel="optimizer step", ylabel="training loss (nats/byte)", ylim=(0, None))
    ax.set_title("Training loss (same tokens, same order)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "study_loss.png", dpi=110)
    plt.close(fig)

    suites = [s for s in RECALL if any(s in m["far"] for m in models.values())]
    size = (4.5 * max(1, len(suites)), 4.2)  # squeeze=False: a list of axes even for one suite
    fig, axes = plt.subplots(1, max(1, len(suites)), figsize=size, sharey=True, squeeze=False)
    for ax, suite in zip(axes[0], suites):

        def per_model(m: dict, suite: str = suite) -> list:
            per = {int(n): r for n, r in m["far"].get(suite, {}).items()}
            exact = {n: 100 * r["accuracy"] for n, r in per.items()}
            tokens = {n: 100 * r["token_accuracy"] for n, r in per.items()}
            return [("o-", lambda v: NAMES.get(v, v), exact), ("x--", lambda v: None, tokens)]

        _lines(ax, models, per_model, "")
        ax.set_title(f"{suite}: far needles")
        ax.set_ylim(-3, 103)
    axes[0][0].set_ylabel("exact match % (solid), answer tokens % (dashed)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "study_recall.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))

    def ppl(m: dict) -> list:
        per = {int(n): r["ppl"] for n, r in m["far"].get("ppl", {}).items()}
        return [("o-", lambda v: NAMES.get(v, v), per)]

    _lines(ax, models, ppl, "perplexity (bytes, held-out text)")
    ax.set_title("Perplexity against length (state carried)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "study_ppl.png", dpi=110)
    plt.close(fig)
    return ["study_loss.png", "study_recall.png", "study_ppl.png"]


def _frac(x: float) -> str:
    """0.2 -> "1/5": the recall mix's shares as the fractions they were chosen as."""
    from fractions import Fraction

    return str(Fraction(x).limit_denominator(20))


def setup(report: dict) -> str:
    """The study's setup, in words, from what study.json recorded (args, model, variants)."""
    a, m = report["args"], report.get("model", OLD_MODEL)
    seq_len, steps, mqar = int(a["seq_len"]), int(a["steps"]), float(a.get("mqar_share", 0.2))
    changed = [
        f"{NAMES.get(v, v)}: "
        + ", ".join(f"`{k}={json.dumps(x)}`" for k, x in d["overrides"].items())
        for v, d in report.get("variants", {}).items()
        if d["overrides"] and v in report["models"]
    ]
    bias = a.get("memory_forget_bias", "None")
    loss = "the answers only" if a.get("answer_loss") == "True" else "every token"
    lengths = ", ".join(
        f"{f}L" if f != "1" else "L" for f in a.get("eval_lengths", "1,2,4").split(",")
    )
    model = (
        f"Setup: byte tokenizer; every model {m['depth']} blocks × width {m['dim']}, "
        f"{m['heads']} heads, sliding window {m['window']} (MAC segment {m['segment_len']}), "
        f"chunk {m['chunk_size']}, {m['num_persistent']} persistent tokens, memory depth "
        f"{m['memory_depth']}, SwiGLU width set per variant for equal parameters. "
        + "".join(f"{c}. " for c in changed)
        + f"Overrides for every variant (`--set`): {a.get('set', '[]')}."
    )
    train = (
        f"Training: {steps} steps × 16 sequences × {seq_len} tokens (L = {seq_len}; "
        f"{steps * 16 * seq_len / 1e6:.1f} M tokens) on the same data in the same order, seed "
        f"{a.get('seed', '0')}: embedded corpus weight {1 - float(a['recall_share']):.2g}; "
        f"recall examples (passkey {_frac(1 - mqar)}, MQAR {_frac(mqar)} with 4 pairs) weight "
        f"{a['recall_share']}, their facts beyond the window, the loss on {loss}; document "
        f"masking {a.get('document_masking', 'off')}; sources mixed by shard, "
        f"{a.get('mix', 'shuffled')}, interleave {a.get('interleave', '8')}; lr {a['lr']}, "
        "memory max lr "
        f"{a['memory_max_lr']}, memory forget bias "
        f"{'the model default' if bias == 'None' else bias}; {a.get('procs', '2')} processes, "
        "ZeRO-2."
    )
    train += _phases(a)
    field = m["depth"] * (m["window"] or 0)
    evaluation = (
        f"Evaluation: `titans-eval`, {a['samples']} examples per suite and length, at "
        f"{lengths} with the state carried; perplexity on {a.get('ppl_tokens', '4096')} "
        f"held-out corpus tokens per length. *far*: needles at depth 0–0.5 of the haystack "
        f"(always more than {m['depth']} × {m['window']} = {field} tokens, the SWA model's "
        "receptive field, before the answer); *near*: the needle right after the haystack, "
        "just before the query (depth 1). Cells: exact-match accuracy % (answer tokens "
        "predicted %)."
    )
    return "\n\n".join(textwrap.fill(t, 99) for t in (model, train, evaluation))


def _phases(a: dict) -> str:
    """The burn-in and the starting weights, when the study had them (study.py's flags)."""
    text, k, seq_len = "", int(a.get("burn_in", 0)), int(a["seq_len"])
    if k:
        text += (
            f" Burn-in {k} (`train.burn_in`): rows of {(k + 1) * seq_len} tokens whose first "
            f"{k * seq_len} run without gradient and loss; far needles {a.get('far_needles', 0)} "
            f"(that share of the recall rows asks for a needle inside the burn-in), fresh share "
            f"{a.get('fresh_share', 0)} (of the other recall rows, on an empty memory)."
        )
    if a.get("init_from", "None") != "None":
        text += (
            f" Every model started from the weights of its run in {a['init_from']} "
            "(`checkpoint.init_from`): this is a second phase."
        )
    return text


def write_report(
    report: dict, docs: Path, command: str | None = None, source: str = "runs/study/study.json"
) -> Path:
    """results.md, its plots and results.json (a copy of ``source``) in ``docs``; the part of
    an existing results.md from NOTES on (hand-written) is kept."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    images = plots(report, docs)
    (docs / "results.json").write_text(json.dumps(report, indent=1))
    path = docs / "results.md"
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else f"{NOTES}\n\n(to be written)\n"
    command = command or report.get("command") or rebuilt_command(report)
    minutes = report["seconds"] / 60
    text = f"""# Results: a small study of recall beyond the attention window

Made by `{command}` in {minutes:.0f} minutes on 2 shared CPU cores (the raw numbers: \
`{source}`, copied to `{docs.name}/results.json`; \
`python benchmarks/study_report.py {docs.name}/results.json --out {docs.name}` redraws this page \
and its plots from the copy).

{setup(report)}

{table(report)}

![training loss]({images[0]})

![recall against evaluation length]({images[1]})

![perplexity against evaluation length]({images[2]})

{notes}"""
    path.write_text(text)
    return path


def rebuilt_command(report: dict) -> str:
    """For studies recorded before study.json kept its command line: one rebuilt from args."""
    return "python benchmarks/study.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in report["args"].items() if k != "out"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "study", nargs="?", type=Path, help="study.json (default runs/study/study.json)"
    )
    ap.add_argument("--out", type=Path, help="where results.md and the plots go (default docs)")
    ap.add_argument(
        "--smoke", action="store_true", help="docs/results_v1.json into --out or a tmp dir"
    )
    args = ap.parse_args(argv)
    default = ROOT / "docs" / "results_v1.json" if args.smoke else Path("runs/study/study.json")
    study = args.study or default
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="study-report-")) if args.smoke else Path("docs")
    )
    report = json.loads(study.read_text())
    try:  # named relative to the repository when it is inside it
        source = str(study.resolve().relative_to(ROOT))
    except ValueError:
        source = str(study)
    if source == str(Path(out) / "results.json"):  # redrawn from its own copy
        source = report["args"].get("out", source)
        source = f"{source}/study.json" if not source.endswith(".json") else source
    page = write_report(report, out, None, source)
    print(page)
    missing = [m for m in report["models"] if NAMES.get(m, m) not in page.read_text()]
    if missing:
        sys.exit(f"study_report: {page} has no row for {', '.join(missing)}")


if __name__ == "__main__":
    main()
