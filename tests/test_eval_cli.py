"""titans-eval perplexity, titans-generate and load_pretrained on an exported (randomly initialised)
tiny model: fast, no DeepSpeed. Checkpoints of every ZeRO stage: test_eval_export.py."""

import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_train import evaluate, generate
from titans_train.data import ShardManifest
from titans_train.models import ModelConfig, TitansLM
from titans_train.pretrained import load_pretrained, save_pretrained


@pytest.fixture(scope="module")
def exported(demo_shards, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant="mag", vocab_size=320, dim=32, depth=2, heads=4, window=24, chunk_size=8,
        num_persistent=2,
    )  # fmt: skip
    model = TitansLM(cfg)
    tokenizer = ShardManifest.load(demo_shards).data["tokenizer"]
    out = tmp_path_factory.mktemp("export")
    save_pretrained(model, out, {"tokenizer": tokenizer})
    return out, model.eval()


def stored_stream(manifest_dir, split: str) -> np.ndarray:
    """The split's tokens read straight from the tar files, shard by shard, member by member."""
    m = ShardManifest.load(manifest_dir)
    parts = []
    for shard in m.shards(split):
        with tarfile.open(manifest_dir / shard.name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".tokens.u16"):
                    parts.append(np.frombuffer(tar.extractfile(member).read(), dtype="<u2"))
    return np.concatenate(parts).astype(np.int64)


def test_exported_weights_follow_the_umask_like_the_other_files(exported):
    out, _ = exported
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_perplexity_is_exp_of_mean_token_loss(exported, demo_shards, tmp_path):
    path, model = exported
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(path), "--data", str(demo_shards), "--suites", "ppl"]
    argv += ["--lengths", "128,384", "--ppl-tokens", "768", "--piece", "50", "--json", str(out)]
    argv += ["--document-masking", "off"]  # the direct reference below runs whole windows
    assert evaluate.main(argv) == 0
    assert torch.is_grad_enabled()  # the CLI must not switch autograd off for its caller
    got = json.loads(out.read_text())["results"]["ppl"]
    stream = torch.from_numpy(stored_stream(demo_shards, "val")[:769])
    for length in (128, 384):
        # Direct: each window in one call, the mean token loss over all 768 targets.
        losses = []
        for a in range(0, 768, length):
            w = stream[a : a + length + 1][None]
            with torch.no_grad():
                logits = model(w[:, :-1]).logits
            losses.append(F.cross_entropy(logits[0], w[0, 1:], reduction="none"))
        mean = torch.cat(losses).double().mean().item()
        r = got[str(length)]
        assert r["tokens"] == 768 and r["split"] == "val"
        assert r["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)


def test_perplexity_with_document_masking_scores_each_document_alone(
    exported, short_doc_shards, tmp_path
):
    """An exported model defaults to masking: every target is scored with the context of its
    own document only, as if each document (cut at the window's start) ran alone."""
    path, model = exported
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(path), "--data", str(short_doc_shards), "--suites", "ppl"]
    argv += ["--lengths", "96", "--ppl-tokens", "192", "--piece", "40", "--json", str(out)]
    assert evaluate.main(argv) == 0
    r = json.loads(out.read_text())["results"]["ppl"]["96"]
    assert r["document_masking"] is True
    tokens, marks, _ = ppl_stream(short_doc_shards)
    losses = []
    for a in range(0, 192, 96):
        w, m = tokens[a : a + 97], marks[a : a + 97].copy()
        m[0] = True
        cuts = [*np.flatnonzero(m[:-1]).tolist(), 96]
        assert len(cuts) > 3  # several documents per window, or the test shows nothing
        for s, e in zip(cuts[:-1], cuts[1:]):
            with torch.no_grad():
                logits = model(torch.from_numpy(w[s:e])[None]).logits[0]
            losses.append(F.cross_entropy(logits, torch.from_numpy(w[s + 1 : e + 1])))
            losses[-1] = losses[-1] * (e - s)
    assert r["ppl"] == pytest.approx(math.exp(sum(losses).item() / 192), rel=1e-5)


def ppl_stream(manifest_dir):
    from titans_train.perplexity import stream_tokens

    return stream_tokens(str(manifest_dir), 193)


def test_default_perplexity_scores_the_split_and_gives_an_interval(exported, demo_shards, capsys):
    # The default once scored 4 x the longest length (a few windows: 22.5 against training's
    # val/ppl 8.9); now up to DEFAULT_PPL_TOKENS, capped at the split, with a 95 % interval.
    path, _ = exported
    argv = ["--checkpoint", str(path), "--data", str(demo_shards), "--suites", "ppl"]
    assert evaluate.main([*argv, "--lengths", "128"]) == 0
    held = len(stored_stream(demo_shards, "val")) - 1
    captured = capsys.readouterr()
    expected = min(evaluate.DEFAULT_PPL_TOKENS, held) // 128 * 128
    assert f"over {expected} val tokens" in captured.err
    table = captured.out.splitlines()
    assert table[0].startswith("length") and table[2].strip().startswith("95 % interval")
    low, high = (float(x) for x in table[2].split()[-1].split("-"))
    assert low < float(table[1].split()[-1]) < high


def test_an_unknown_suite_is_named(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "x", "--suites", "ppl,bogus"])
    assert "unknown suite 'bogus'" in capsys.readouterr().err


def test_the_needle_cut_reaches_the_examples_and_the_json(exported, tmp_path, monkeypatch):
    """--needle-cut token: recall_suite is asked for token cuts, and the JSON's settings say so
    (results with either cut must not be mixed unknowingly)."""
    import json

    from titans_train import recall

    cuts, real = [], recall.generate
    monkeypatch.setattr(
        recall, "generate", lambda *a, **kw: cuts.append(kw["cut"]) or real(*a, **kw)
    )
    path, _ = exported
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(path), "--suites", "passkey", "--lengths", "128", "--samples", "2"]
    assert evaluate.main([*argv, "--needle-cut", "token", "--json", str(out)]) == 0
    assert cuts == ["token"] and json.loads(out.read_text())["settings"]["needle_cut"] == "token"
    with pytest.raises(SystemExit):
        evaluate.parse_args([*argv, "--needle-cut", "word"])


def test_generation_with_and_without_cache_gives_the_same_tokens(exported, tmp_path, capsys):
    path, _ = exported
    prompt = "def parse(text):\n    return [line.strip() for line in text.splitlines()]\n" * 2
    assert len(prompt) > 3 * 24  # longer than the attention window: the state carries it
    runs = {}
    for name, extra in (("cached", []), ("uncached", ["--no-cache"])):
        out = tmp_path / f"{name}.json"
        argv = ["--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "12"]
        argv += ["--temperature", "0.9", "--top-k", "40", "--seed", "5", "--prefill-chunk", "20"]
        assert generate.main(argv + ["--json", str(out)] + extra) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["cached"]["ids"] == runs["uncached"]["ids"]
    assert len(runs["cached"]["ids"]) == 12 and runs["cached"]["tokens_per_second"] > 0
    err = capsys.readouterr().err
    assert "new tokens/s" in err and "cached state" in err and "no cache" in err


def test_load_pretrained_reproduces_and_rejects_a_mismatch(exported, tmp_path):
    path, model = exported
    loaded = load_pretrained(str(path))
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["model"]["dim"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bad/model.safetensors does not match .*config.json"):
        load_pretrained(str(bad))
    assert generate.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) == 2
