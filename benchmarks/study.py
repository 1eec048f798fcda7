"""A small, reproducible study: do Titans variants recall facts beyond the attention window?

    python benchmarks/study.py --docs docs      # ~40 min on 2 CPU cores; results in runs/study
    python benchmarks/study.py --smoke --out DIR   # MAC only, 2 steps, 2 examples (CI)
    python benchmarks/study.py --eval-lengths 1,2,4,8 --variants mac,mac-memtok,mac-input,...

1. Data: the embedded corpus (stdlib sources, byte tokenizer) and a recall training set of
   passkey and MQAR examples (synthetic.py) whose facts lie beyond the receptive field of the
   sliding window (depth x window tokens), each exactly seq_len tokens so it packs into one sample.
2. Models: MAC, MAG, MAL, LMM and Transformer++ with sliding-window attention, one width and
   depth, the SwiGLU width of each chosen so all have the same parameter count as MAC; and, as a
   control, Transformer++ with full attention.
3. Training: the real trainer (2 processes, ZeRO-2), the same steps, batch and data order for
   every model, so the same tokens.
4. Evaluation: ``titans-eval`` on each final checkpoint: perplexity with carried state, the four
   recall suites at the training length and beyond with the needles far from the query, and an
   in-window control (needles right before the query).
5. ``docs/results.md`` with the table, loss and recall plots and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study_data import build_data  # noqa: E402

from titans_train.models import ModelConfig, TitansLM  # noqa: E402

# name -> (model.variant, overrides of MODEL). The last is a control, not a contender: the same
# Transformer++ with unrestricted attention tells "cannot reach the fact" (SWA beyond its window)
# apart from "never learned to retrieve at all" in this budget.
VARIANTS = {
    "mac": ("mac", {}),
    "mag": ("mag", {}),
    "mal": ("mal", {}),
    "lmm": ("lmm", {}),
    "transformer": ("transformer", {}),
    "full-attention": ("transformer", {"window": None}),
}
# MAC's memory_tokens read-out with N_l = 16 learned queries, not the paper's 256: at our
# segment of 16 tokens, 256 would make the retrieved prefix 16 times longer than the segment it
# serves (the paper pairs N_l = 256 with C = 512), so attention would be spent mostly on it.
# A deviation at our scale (docs/results.md says so beside the numbers).
MEMTOK = {"mac_retrieval": "memory_tokens", "num_memory_tokens": 16}
# Studied on request only (--variants), not in the default set: deviations from the paper.
EXTRA_VARIANTS = {
    "mac-input": ("mac", {"mac_write": "input"}),  # MAC writes its block input
    "mac-stopgrad": ("mac", {"mac_write": "output_stopgrad"}),  # no gradient write -> h
    "mac-input-memtok": ("mac", {"mac_write": "input", **MEMTOK}),
    "mac-memtok": ("mac", MEMTOK),  # the paper's other read-out
    # the control with the local token mixing the memories have (model.token_conv; MQAR)
    "full-attention-conv": ("transformer", {"window": None, "token_conv": 4}),
}
ALL = {**VARIANTS, **EXTRA_VARIANTS}
# The tiny preset's shape with a short window, so "beyond the window" fits in a 128-token sample.
MODEL = dict(
    vocab_size=320, dim=64, depth=2, heads=4, window=16, segment_len=16, chunk_size=16,
    num_persistent=4, memory_depth=2,
)  # fmt: skip
SUITES = "ppl,passkey,number,mqar"  # uuid needs more than 128 tokens


def match_ffn(name: str, target: int, model_set: dict | None = None) -> tuple[int, int]:
    """The SwiGLU width (a multiple of 8) that brings model ``name`` closest to ``target``."""
    variant, extra = ALL[name]
    best = None
    for hidden in range(8, 1024, 8):
        cfg = ModelConfig(
            **{**MODEL, **extra, **(model_set or {})}, variant=variant, ffn_hidden=hidden
        )
        n = TitansLM(cfg).num_params()
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (hidden, n)
        if n > target:
            break
    return best


def parse_set(items: list[str]) -> dict:
    """--set KEY=VALUE ... -> ModelConfig overrides (numbers, true/false, null parsed as JSON)."""
    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or key not in ModelConfig.__dataclass_fields__:
            raise SystemExit(f"study: --set {item!r}: expected KEY=VALUE with a ModelConfig key")
        out[key] = json.loads(val) if val[:1] in "-0123456789tfn[" else val
    return out


def eval_lengths(spec: str, seq_len: int) -> str:
    """--eval-lengths "1,2,4,8" (multiples of the training length) -> titans-eval --lengths."""
    try:
        factors = [int(f) for f in spec.split(",")]
    except ValueError:
        factors = []
    if not factors or min(factors) < 1:
        raise SystemExit(f"study: --eval-lengths {spec!r}: expected whole multiples like 1,2,4,8")
    return ",".join(str(f * seq_len) for f in factors)


def env() -> dict[str, str]:
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )


def data_overrides(data: tuple[Path, Path], recall_share: float) -> list[str]:
    """data.train and data.weights: corpus and recall by share; at 1 the recall shards alone
    (the loader refuses a source of weight 0)."""
    if recall_share >= 1:
        return [f"data.train=[{data[1]}]", "data.weights=[1.0]"]
    return [
        f"data.train=[{data[0]},{data[1]}]",
        f"data.weights=[{1 - recall_share},{recall_share}]",
    ]


def train(name: str, ffn: int, data: tuple[Path, Path], run_dir: Path, args) -> float:
    if (run_dir / "checkpoints" / "latest").is_file():
        return 0.0  # already trained (the study resumes where it stopped)
    variant, extra = ALL[name]
    model = {**MODEL, **extra, **parse_set(args.set)}
    overrides = [f"model.{k}={'null' if v is None else v}" for k, v in model.items()]
    overrides += [
        f"model.variant={variant}",
        f"model.ffn_hidden={ffn}",
        f"model.memory_max_lr={args.memory_max_lr}",
        *(
            [f"model.memory_forget_bias={args.memory_forget_bias}"]
            * (args.memory_forget_bias is not None)
        ),
        *data_overrides(data, args.recall_share),
        f"data.document_masking={str(args.document_masking == 'on').lower()}",
        f"data.mix={args.mix}",
        f"data.interleave={args.interleave}",
        f"run_dir={run_dir}",
        f"name=study-{name}",
        f"train.seq_len={args.seq_len * (args.burn_in + 1)}",
        f"train.burn_in={args.seq_len * args.burn_in}",
        "train.global_batch=16",
        f"train.micro_batch={16 // args.procs}",
        f"train.max_steps={args.steps}",
        f"train.seed={args.seed}",
        f"data.seed={args.seed}",
        f"train.eval_interval={args.steps}",
        "train.eval_batches=8",
        f"optim.lr={args.lr}",
        f"optim.min_lr={args.lr / 10}",
        "optim.warmup_steps=50",
        f"checkpoint.interval={args.steps}",
        "tracking.mode=disabled",
        "tracking.log_interval=10",
        *([f"checkpoint.init_from={args.init_from / name}"] if args.init_from else []),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.procs}",
    ]
    cmd += ["-m", "titans_train.cli", "--config", "configs/experiments/tiny_mac.yaml"]
    t0 = time.perf_counter()
    log = run_dir.with_suffix(".train.log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(cmd + overrides, cwd=ROOT, env=env(), stdout=f, stderr=f, check=True)
    return time.perf_counter() - t0


def evaluate(run_dir: Path, data: Path, out: Path, lengths: str, depth: str, args) -> dict:
    if not out.is_file():
        cmd = [sys.executable, "-m", "titans_train.evaluate", "--checkpoint", str(run_dir)]
        cmd += ["--data", str(data), "--lengths", lengths, "--suites", args.suites]
        cmd += ["--samples", str(args.samples), "--depth", depth, "--pairs", "4"]
        cmd += ["--needle-cut", args.needle_cut]
        cmd += ["--ppl-tokens", str(args.ppl_tokens), "--json", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
        if proc.returncode:  # titans-eval's own last line says what went wrong
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"study: titans-eval {run_dir.name} exited {proc.returncode}: {tail}")
    return json.loads(out.read_text())


def losses(run_dir: Path) -> tuple[list[int], list[float], float | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    vals = [r["loss"] for r in rows if "loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    return steps, vals, val[-1] if val else None


def save(report: dict, path: Path) -> None:
    """study.json written whole, then renamed over the old one: an interrupted write never
    leaves a truncated file that the next run could not resume from."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def resume(report: dict, path: Path) -> dict:
    """The models already in ``path`` (a previous run of the same study, stopped or with fewer
    variants) carried into ``report``; a study with other settings starts afresh."""
    if not path.is_file():
        return report
    old = json.loads(path.read_text())
    defaults = {  # options added after some studies were recorded: their values back then
        "ppl_tokens": "4096", "memory_forget_bias": "None", "document_masking": "off",
        "procs": "2", "answer_loss": "False", "mqar_share": "0.2", "seed": "0", "set": "[]",
        "haystack_phase": "False", "eval_lengths": "1,2,4", "mix": "shuffled", "interleave": "8",
        "burn_in": "0", "needle_cut": "sentence", "far_needles": "0.0", "fresh_share": "0.0",
    }  # fmt: skip
    old_args = {**{k: v for k, v in defaults.items() if k in report["args"]}, **old["args"]}
    if settings(old_args) != settings(report["args"]):
        print(f"study: {path} has other settings; its models are not reused", flush=True)
        return report
    report["models"] = old["models"]
    report["seconds"] = old.get("seconds", 0.0)
    report["variants"] = {**old.get("variants", {}), **report["variants"]}
    return report


def settings(args: dict) -> dict:
    """What makes two runs the same study: every option but the variants (a study extended by
    more), where the report goes, and --out as typed (the study.json found there is the same
    file however its path was spelled: relative, absolute, with a trailing slash)."""
    return {k: v for k, v in args.items() if k not in ("variants", "docs", "out")}


def run_models(names: list[str], report: dict, path: Path, one: Callable[[str], dict]) -> dict:
    """``one(name)`` for each name not yet in ``report``, study.json rewritten after each model,
    so a stopped study keeps what finished and a re-run skips it; ``seconds`` is the study's
    wall time, summed over the runs that made it."""
    for name in names:
        if name in report["models"]:
            print(f"{name}: already in {path}, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        report["models"][name] = one(name)
        report["models"][name]["seconds"] = time.perf_counter() - t0
        report["seconds"] += report["models"][name]["seconds"]
        save(report, path)
    save(report, path)  # also when every model was already done (the args, the command)
    return report


def study_model(name: str, target: int, data: tuple, out: Path, lengths: str, args) -> dict:
    """Train (unless its checkpoint exists), evaluate far and near, and collect one model's row."""
    ffn, params = match_ffn(name, target, parse_set(args.set))
    run_dir = out / name
    seconds = train(name, ffn, data, run_dir, args)
    t0 = time.perf_counter()
    far = evaluate(run_dir, data[0], out / f"{name}.far.json", lengths, "0,0.5", args)
    near = evaluate(run_dir, data[0], out / f"{name}.near.json", str(args.seq_len), "1,1", args)
    eval_seconds = time.perf_counter() - t0
    steps, train_loss, val_loss = losses(run_dir)
    print(f"{name}: {params} params, trained in {seconds:.0f} s", flush=True)
    return {
        "ffn_hidden": ffn, "params": params, "train_seconds": seconds,
        "eval_seconds": eval_seconds, "val_loss": val_loss, "loss_steps": steps,
        "loss": train_loss, "far": far["results"], "near": near["results"],
    }  # fmt: skip


def smoke(args: argparse.Namespace) -> None:
    """--smoke: the whole study (data, real trainer, titans-eval, report) for one model at the
    smallest sizes; into a temp dir unless --out is given, the report beside study.json."""
    args.steps, args.samples, args.suites, args.variants = 2, 2, "ppl,passkey", "mac"
    args.ppl_tokens = 1024
    args.out = args.out or Path(tempfile.mkdtemp(prefix="study-smoke-"))
    args.docs = args.docs or args.out / "docs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="run dir (default runs/study)")
    ap.add_argument("--docs", type=Path, default=None, help="write results.md and plots here")
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--memory-max-lr", type=float, default=0.1)
    ap.add_argument(
        "--memory-forget-bias",
        type=float,
        default=None,
        help="model.memory_forget_bias (default: the model's own)",
    )
    ap.add_argument("--recall-share", type=float, default=0.9)
    ap.add_argument(
        "--document-masking",
        choices=("on", "off"),
        default="on",
        help="data.document_masking (the study in docs/results.md ran before it existed: off)",
    )
    ap.add_argument(
        "--answer-loss",
        action="store_true",
        help="the recall examples carry loss on their answers only (as in Zoology)",
    )
    ap.add_argument("--mqar-share", type=float, default=0.2, help="MQAR's share of recall data")
    ap.add_argument(
        "--haystack-phase",
        action="store_true",
        help="--answer-loss data: pass-key haystacks start at a random point of the noise text",
    )
    ap.add_argument(
        "--burn-in",
        type=int,
        default=0,
        help="K: rows of (K+1) x seq-len tokens, the first K x seq-len run without gradient "
        "(train.burn_in), recall examples after 0..K x seq-len tokens of haystack (needs "
        "--answer-loss and document masking; study_data.burn_in_rows)",
    )
    ap.add_argument(
        "--far-needles",
        type=float,
        default=0.0,
        help="with --burn-in: this share of the recall rows has its needle in the burn-in "
        "(study_data.far_needles)",
    )
    ap.add_argument(
        "--fresh-share",
        type=float,
        default=0.0,
        help="with --burn-in: this share of the other recall rows starts on an empty memory",
    )
    ap.add_argument("--seed", type=int, default=0, help="train.seed and data.seed (init, order)")
    ap.add_argument(
        "--init-from",
        type=Path,
        help="each variant starts from the weights of DIR/<variant> (checkpoint.init_from), "
        "e.g. a study trained at L, for a second phase with other data",
    )
    ap.add_argument(
        "--set", nargs="*", default=[], help="model overrides KEY=VALUE for every variant"
    )
    ap.add_argument("--procs", type=int, choices=(1, 2), default=2, help="trainer processes")
    ap.add_argument(
        "--mix",
        choices=("stratified", "shuffled"),
        default="stratified",
        help="data.mix (studies before 2026-12-02: shuffled, with --interleave 8)",
    )
    ap.add_argument(
        "--interleave",
        type=int,
        default=16,
        help="data.interleave: 16 gives the corpus (10 %% of the shards) a shard in every stripe, "
        "so every step reads corpus rows (docs/data.md, Mixing); a multiple of --procs",
    )
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--suites", default=SUITES)
    ap.add_argument(
        "--needle-cut",
        choices=("sentence", "token"),
        default="sentence",
        help="titans-eval --needle-cut (token: needles at any position, not only token 0 at L)",
    )
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="titans-eval --ppl-tokens")
    ap.add_argument(
        "--eval-lengths", default="1,2,4", help="far needles and perplexity at these x seq-len"
    )
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"names from VARIANTS, or {', '.join(EXTRA_VARIANTS)}",
    )
    ap.add_argument("--smoke", action="store_true", help="MAC only, 2 steps, 2 examples (CI)")
    args = ap.parse_args(argv)
    if args.interleave % args.procs:
        ap.error(f"--interleave {args.interleave} is not a multiple of --procs {args.procs}")
    if args.burn_in < 0 or (
        args.burn_in and (not args.answer_loss or args.document_masking != "on")
    ):
        ap.error(f"--burn-in {args.burn_in}: must be >= 0; > 0 needs --answer-loss and masking on")
    for key in ("far_needles", "fresh_share"):
        share = getattr(args, key)
        if not 0 <= share <= 1 or (share and not args.burn_in):
            ap.error(f"--{key.replace('_', '-')} {share}: a share in [0, 1], with --burn-in")
    if args.smoke:
        smoke(args)
    for name in args.variants.split(","):
        if name not in ALL:
            ap.error(f"--variants: unknown {name!r}; known: {', '.join(ALL)}")
        if args.init_from and not (args.init_from / name).is_dir():
            ap.error(f"--init-from {args.init_from}: no run {name!r} there")
    return args


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(given)
    lengths = eval_lengths(args.eval_lengths, args.seq_len)
    args.out = args.out or ROOT / "runs" / "study"  # as before: study.json's args name it
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    t0 = time.perf_counter()
    docs = 64 if args.smoke else max(2000, args.steps * 8)
    data = build_data(
        out, args.seq_len, docs, 0.5 if args.smoke else 4.0, args.answer_loss, args.mqar_share,
        args.haystack_phase, args.burn_in * args.seq_len, args.far_needles, args.fresh_share,
    )  # fmt: skip
    report = {
        "command": " ".join(["python", "benchmarks/study.py", *given]),
        "argv": [sys.argv[0] if argv is None else "benchmarks/study.py", *given],
        "args": {k: str(v) for k, v in vars(args).items() if k != "smoke"},
        "model": MODEL,
        "variants": {v: {"variant": ALL[v][0], "overrides": ALL[v][1]} for v in names},
        "models": {},
        "seconds": 0.0,
    }
    report = resume(report, out / "study.json")
    report["seconds"] += time.perf_counter() - t0  # the data (built once, checked on resume)
    target = TitansLM(ModelConfig(variant="mac", **MODEL)).num_params()

    def one(variant: str) -> dict:
        return study_model(variant, target, data, out, lengths, args)

    run_models(names, report, out / "study.json", one)
    if args.docs:
        from study_report import write_report

        source = out / "study.json"
        source = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
        write_report(report, args.docs, report["command"], str(source))
    print(f"done in {report['seconds'] / 60:.1f} min: {out / 'study.json'}")


if __name__ == "__main__":
    main()
