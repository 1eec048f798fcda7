"""Tokenization throughput of `titans-data tokenize` against HF tokenizers' own batch encode.

Same text (Python stdlib sources), same byte-level BPE tokenizer, same run. Each measurement
runs in a fresh process, so tokenizers' thread pool is at its default for the direct call
(all cores) while the job runs --workers single-threaded processes. The job's time is the
whole job: read, tokenize, shuffle, pack, write and hash shards, manifest. Prints JSON.

    PYTHONPATH=. python benchmarks/bench_tokenize.py [--max-mb 8] [--tokenizer tok.json] [--out F]
    PYTHONPATH=. python benchmarks/bench_tokenize.py --smoke --out FILE   # seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from data_pipelines.demo import stdlib_files
from data_pipelines.sources import iter_documents


def direct(files: list[str], tokenizer: str) -> dict:
    from tokenizers import Tokenizer

    texts = list(iter_documents(files))
    tok = Tokenizer.from_file(tokenizer)
    start = time.perf_counter()
    encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encoded)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "bytes": sum(len(t.encode()) for t in texts)}


def job(files: list[str], tokenizer: str, workers: int) -> dict:
    from data_pipelines.tokenize import TokenizeConfig, run

    with tempfile.TemporaryDirectory() as out:
        cfg = TokenizeConfig(
            files,
            out,
            tokenizer=tokenizer,
            seq_len=1024,
            samples_per_shard=256,
            workers=workers,
            progress=False,
        )
        start = time.perf_counter()
        totals = run(cfg)["totals"]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": totals["tokens"], "bytes": totals["text_bytes"]}


def measure(args: list[str], max_mb: float) -> dict:
    """One measurement in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--max-mb", str(max_mb), "--measure", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    result["MB/s"] = result["bytes"] / result["seconds"] / 2**20
    result["tokens/s"] = result["tokens"] / result["seconds"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--tokenizer", help="tokenizer.json (default: BPE 8192 trained on the text)")
    p.add_argument("--repeat", type=int, default=2, help="best of N")
    p.add_argument("--smoke", action="store_true", help="0.1 MB of text, one round (CI)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.max_mb, args.repeat = 0.1, 1
    files = stdlib_files(args.max_mb)
    if args.measure:
        what, tokenizer, *rest = args.measure
        result = (
            direct(files, tokenizer) if what == "direct" else job(files, tokenizer, int(rest[0]))
        )
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from data_pipelines.train_tokenizer import train_tokenizer

            tokenizer = train_tokenizer(files, os.path.join(tmp, "tok.json"), progress=False)
        runs = {"direct encode_batch_fast": ["direct", tokenizer]}
        runs.update({f"tokenize --workers {w}": ["job", tokenizer, str(w)] for w in (1, 2)})
        results: dict[str, dict] = {}
        for _ in range(args.repeat):  # rounds interleave the configurations: drift hits all
            for name, cmd in runs.items():
                r = measure(cmd, args.max_mb)
                if name not in results or r["tokens/s"] > results[name]["tokens/s"]:
                    results[name] = r
    base = results["direct encode_batch_fast"]["tokens/s"]
    for r in results.values():
        r["ratio_to_direct"] = r["tokens/s"] / base
    report = {
        "benchmark": "tokenize",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "text_mb": args.max_mb,
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    # The same text and tokenizer: the job gives the same tokens with any number of workers
    # (the direct call has no end-of-document ids, so it counts a few fewer).
    counts = {name: r["tokens"] for name, r in results.items()}
    jobs = {n for name, n in counts.items() if name.startswith("tokenize")}
    if len(jobs) != 1 or not all(counts.values()):
        sys.exit(f"bench_tokenize: token counts {counts}")


if __name__ == "__main__":
    main()
