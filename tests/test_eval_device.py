"""--device and --dtype of titans-eval, titans-generate and titans-export (exported tiny model)."""

import json

import pytest
import torch
from safetensors import safe_open

from titans_train import evaluate, export, generate
from titans_train.data import ShardManifest
from titans_train.load import open_checkpoint, resolve_device
from titans_train.models import ModelConfig, TitansLM
from titans_train.pretrained import save_pretrained


@pytest.fixture(scope="module")
def exported(demo_shards, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant="mac", vocab_size=320, dim=32, depth=1, heads=2, window=16, segment_len=16,
        chunk_size=8, num_persistent=2,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("export")
    save_pretrained(
        TitansLM(cfg), out, {"tokenizer": ShardManifest.load(demo_shards).data["tokenizer"]}
    )
    return out


def ppl(exported, demo_shards, tmp_path, *extra) -> float:
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(exported), "--data", str(demo_shards), "--suites", "ppl"]
    argv += ["--lengths", "64", "--ppl-tokens", "128", "--piece", "32", "--json", str(out)]
    assert evaluate.main(argv + list(extra)) == 0
    return json.loads(out.read_text())["results"]["ppl"]["64"]["ppl"]


def test_eval_in_bf16_is_close_to_fp32(exported, demo_shards, tmp_path):
    fp32 = ppl(exported, demo_shards, tmp_path, "--device", "cpu")
    bf16 = ppl(exported, demo_shards, tmp_path, "--dtype", "bf16")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_default_device_is_deepspeeds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # DS_ACCELERATOR=cpu wins
    assert resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "gpu", "xpu"])
def test_an_unusable_device_is_a_clear_error(exported, device, capsys):
    argv = ["--checkpoint", str(exported), "--prompt", "x", "--device", device]
    assert generate.main(argv) == 2
    assert f"--device {device}" in capsys.readouterr().err


def test_generate_and_export_in_bf16(exported, tmp_path, capsys):
    argv = ["--checkpoint", str(exported), "--prompt", "def f(", "--max-new-tokens", "4"]
    assert generate.main(argv + ["--temperature", "0", "--dtype", "bf16"]) == 0
    out = tmp_path / "bf16"
    assert export.main(["--checkpoint", str(exported), "--out", str(out), "--dtype", "bf16"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    model = open_checkpoint(out).model()
    original = open_checkpoint(exported).model()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16).float()), name
