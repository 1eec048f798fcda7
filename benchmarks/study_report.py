"""docs/results.md and its plots from runs/study/study.json (written by study.py).

python benchmarks/study_report.py [runs/study/study.json] [--out docs]
python benchmarks/study_report.py --smoke --out DIR   # docs/results.json redrawn in DIR (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
}
# What follows this heading in results.md is written by hand and kept when the page is redrawn.
NOTES = "## What we see, and why"


def _pct(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{100 * r['accuracy']:.0f} ({100 * r['token_accuracy']:.0f})"


def table(report: dict) -> str:
    """One table of size, loss and perplexity; one per recall suite: near, then far by length."""
    models = report["models"]
    lengths = sorted({int(n) for m in models.values() for n in m["far"].get("ppl", {})})
    cols = " | ".join(f"ppl {n}" for n in lengths)
    lines = [f"| model | params | SwiGLU | val loss | {cols} |", "|---" * (4 + len(lengths)) + "|"]
    for v, m in models.items():
        ppl = m["far"].get("ppl", {})
        cells = " | ".join(f"{ppl[str(n)]['ppl']:.2f}" for n in lengths if str(n) in ppl)
        val = "–" if m["val_loss"] is None else f"{m['val_loss']:.3f}"
        size = f"{m['params']:,} | {m['ffn_hidden']}"
        lines.append(f"| {NAMES.get(v, v)} | {size} | {val} | {cells} |")
    for suite in RECALL:
        lens = sorted({int(n) for m in models.values() for n in m["far"].get(suite, {})})
        if not lens:
            continue
        cols = " | ".join(f"far {n}" for n in lens)
        lines += ["", f"**{suite}**", "", f"| model | near {lens[0]} | {cols} |"]
        lines.append("|---" * (2 + len(lens)) + "|")
        for v, m in models.items():
            near = next(iter(m["near"].get(suite, {}).values()), None)
            far = " | ".join(_pct(m["far"][suite].get(str(n))) for n in lens)
            lines.append(f"| {NAMES.get(v, v)} | {_pct(near)} | {far} |")
    return "\n".join(lines)


def plots(report: dict, docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, m in models.items():
        ax.plot(m["loss_steps"], m["loss"], label=NAMES.get(v, v))
    ax.set(xlabel="optimizer step", ylabel="training loss (nats/byte)", ylim=(0, None))
    ax.set_title("Training loss (same tokens, same order)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "study_loss.png", dpi=110)
    plt.close(fig)

    suites = [s for s in RECALL if any(s in m["far"] for m in models.values())]
    size = (4 * len(suites), 3.6)  # squeeze=False: a list of axes even for one suite
    fig, axes = plt.subplots(1, len(suites), figsize=size, sharey=True, squeeze=False)
    axes = axes[0]
    for ax, suite in zip(axes, suites):
        for v, m in models.items():
            per = m["far"].get(suite, {})
            xs = sorted(int(n) for n in per)
            acc = [100 * per[str(n)]["token_accuracy"] for n in xs]
            ax.plot(xs, acc, "o-", label=NAMES.get(v, v))
        ax.set(title=f"{suite}: far needles", xlabel="context length", xscale="log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    axes[0].set_ylabel("answer tokens predicted (%)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(docs / "study_recall.png", dpi=110)
    plt.close(fig)
    return ["study_loss.png", "study_recall.png"]


def write_report(report: dict, docs: Path, command: str) -> Path:
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    images = plots(report, docs)
    path = docs / "results.md"
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else f"{NOTES}\n\n(to be written)\n"
    a = report["args"]
    text = f"""# Results: a small study of recall beyond the attention window

Made by `{command}` in {report["seconds"] / 60:.0f} minutes on 2 shared CPU cores
(the raw numbers: `runs/study/study.json`, copied to `docs/results.json`;
`python benchmarks/study_report.py` redraws this page).

Setup: byte tokenizer; every model 2 blocks × width 64, 4 heads, sliding window 16 (MAC segment
16), chunk 16, 4 persistent tokens, memory depth 2, SwiGLU width set per variant for equal
parameters; {a["steps"]} steps × 16 sequences × {a["seq_len"]} tokens on the same data in the
same order (embedded corpus weight {1 - float(a["recall_share"]):.2g}; passkey (4/5) + MQAR (1/5)
examples weight {a["recall_share"]}, whose facts lie beyond the window), lr {a["lr"]},
memory max lr {a["memory_max_lr"]}, 2 processes, ZeRO-2.
Evaluation: `titans-eval`, {a["samples"]} examples per suite and length. *far*: needles at depth
0–0.5 of the haystack (always more than 2 × 16 tokens, the SWA model's receptive field, before
the answer); *near*: the needle right after the haystack, just before the query (depth 1).
Cells: exact-match accuracy % (answer tokens predicted %).

{table(report)}

![training loss]({images[0]})

![recall]({images[1]})

{notes}"""
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "study", nargs="?", type=Path, help="study.json (default runs/study/study.json)"
    )
    ap.add_argument("--out", type=Path, help="where results.md and the plots go (default docs)")
    ap.add_argument(
        "--smoke", action="store_true", help="docs/results.json into --out or a tmp dir"
    )
    args = ap.parse_args(argv)
    default = ROOT / "docs" / "results.json" if args.smoke else Path("runs/study/study.json")
    study = args.study or default
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="study-report-")) if args.smoke else Path("docs")
    )
    report = json.loads(study.read_text())
    command = "python benchmarks/study.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in report["args"].items() if k != "out"
    )
    page = write_report(report, out, command)
    print(page)
    missing = [m for m in report["models"] if NAMES.get(m, m) not in page.read_text()]
    if missing:
        sys.exit(f"study_report: {page} has no row for {', '.join(missing)}")


if __name__ == "__main__":
    main()
