"""Every variant under DeepSpeed ZeRO-3 (2 ranks, gloo, every parameter partitioned) gives the same
loss and gradients as the plain module on the same global batch."""

import json

import pytest
from distributed import ROOT, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_zero3_matches_plain_module():
    variants = ["mac", "mac:memory_tokens", "mag", "mal", "lmm", "transformer"]
    proc = torchrun(ROOT / "tests" / "scripts" / "zero3_parity.py", ",".join(variants))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == variants
    for r in rows:
        assert r["loss_diff"] < 1e-5, r
        assert r["grad_diff"] < 1e-5, r
