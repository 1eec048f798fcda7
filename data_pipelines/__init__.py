"""Offline data jobs: corpus -> tokenizer -> packed webdataset shards + manifest.json.

Entry points: `titans-data <tokenize|train-tokenizer|verify|inspect|demo> --help`, or
`python -m data_pipelines.<tokenize|train_tokenizer|verify|inspect|demo>`. See docs/data.md.
"""
