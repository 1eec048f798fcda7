"""`titans-data` (also `titans-train data`): one command for the offline data jobs (docs/data.md,
"CLIs"). Each job is a tool module (add_arguments + run_args) dispatched by cli_common."""

from __future__ import annotations

from titans_train.cli_common import Command, dispatch

DESCRIPTION = "Corpus -> tokenizer -> packed webdataset shards."
COMMANDS = {
    "tokenize": Command(
        "data_pipelines.tokenize", "corpus -> packed webdataset shards of K samples + manifest.json"
    ),
    "train-tokenizer": Command(
        "data_pipelines.train_tokenizer", "a byte-level BPE tokenizer.json trained on a corpus"
    ),
    "verify": Command(
        "data_pipelines.verify", "re-hash every shard against its manifest and check every sample"
    ),
    "inspect": Command(
        "data_pipelines.inspect", "a manifest's summary, one shard's token statistics, samples"
    ),
    "demo": Command("data_pipelines.demo", "shards from an embedded corpus (Python's own sources)"),
}


def main(argv: list[str] | None = None, prog: str = "titans-data") -> int:
    return dispatch(prog, DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
