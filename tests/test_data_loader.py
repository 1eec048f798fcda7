"""Loader features beyond resume: http sources, weighted mixing, the validation loader."""

import functools
import http.server
import json
import threading
from collections import Counter

import pytest
from data_helpers import shards_from_corpus, step_hashes

from titans_train.data import DataError, StreamingLoader, validation_loader

KW = dict(seq_len=31, vocab_size=257, micro_batch=2, interleave=4)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    shards_from_corpus(root, "a", 96, samples_per_shard=8, val_fraction=0.2)
    shards_from_corpus(root, "b", 40, seed=1, samples_per_shard=8, val_fraction=0.2)
    return root


def test_http_source_reads_like_local(two_sources, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # webdataset opens http(s) with curl
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(two_sources / "a")
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/manifest.json"
        remote = StreamingLoader(url, global_batch=8, verify=True, **KW)
        local = StreamingLoader(str(two_sources / "a"), global_batch=8, **KW)
        assert [step_hashes(remote.next_step()) for _ in range(12)] == [
            step_hashes(local.next_step()) for _ in range(12)
        ]
    finally:
        server.shutdown()


def test_weighted_mixing_is_deterministic_and_resumable(two_sources):
    paths = [str(two_sources / "a"), str(two_sources / "b")]
    loader = StreamingLoader(paths, weights=[0.3, 0.7], global_batch=8, seed=5, **KW)
    steps = [loader.next_step() for _ in range(40)]
    sources = Counter(int(s) for step in steps for mb in step for s in mb.sample_ids[:, 0])
    assert abs(sources[1] / 320 - 0.7) < 0.1  # b is upsampled to its weight
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [step_hashes(loader.next_step()) for _ in range(10)]
    again = StreamingLoader(paths, weights=[0.3, 0.7], global_batch=8, seed=5, num_workers=2, **KW)
    again.load_state_dict(state)
    assert [step_hashes(again.next_step()) for _ in range(10)] == rest
    with pytest.raises(DataError, match="loader state was saved for"):
        StreamingLoader(paths, weights=[0.5, 0.5], global_batch=8, seed=5, **KW).load_state_dict(
            state
        )


def test_validation_loader_is_one_pass_in_equal_steps(two_sources):
    path = str(two_sources / "a")
    full = [h for step in validation_loader(path, global_batch=4, **KW) for h in step_hashes(step)]
    ranks = [validation_loader(path, global_batch=4, rank=r, world_size=2, **KW) for r in range(2)]
    per_rank = [[step_hashes(s) for s in loader] for loader in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(full) // 4 > 0
    assert len(set(full)) == len(full)
    assert sorted(h for steps in per_rank for s in steps for h in s) == sorted(full)
