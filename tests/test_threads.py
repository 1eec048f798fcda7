"""A small model runs on one intra-op thread on CPU, forward and backward, and the
caller's thread setting is back after each (titans_train/models/threads.py, issue 16)."""

from __future__ import annotations

import pytest
import torch

from titans_train.models import ModelConfig, RuntimeConfig, TitansLM, memory_scan, threads


def tiny_mac() -> TitansLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant="mac", vocab_size=32, dim=32, depth=2, heads=2, window=8, segment_len=8,
        chunk_size=4, num_persistent=2, memory_depth=2,
    )  # fmt: skip
    return TitansLM(cfg)


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def record_backward_threads(monkeypatch) -> list[int]:
    """The thread count each memory group's backward runs at."""
    seen, orig = [], memory_scan._HandChunks.backward

    def backward(ctx, *grads):
        seen.append(torch.get_num_threads())
        return orig(ctx, *grads)

    monkeypatch.setattr(memory_scan._HandChunks, "backward", staticmethod(backward))
    return seen


def record_block_threads(model: TitansLM, monkeypatch) -> list[int]:
    """The thread count each block's forward starts at."""
    seen, cls = [], type(model.blocks[0])
    orig = cls.forward

    def forward(self, *args):
        seen.append(torch.get_num_threads())
        return orig(self, *args)

    monkeypatch.setattr(cls, "forward", forward)
    return seen


def test_small_model_blocks_on_one_thread(two_threads, monkeypatch):
    model, in_backward = tiny_mac(), record_backward_threads(monkeypatch)
    in_forward = record_block_threads(model, monkeypatch)
    tokens = torch.randint(0, 32, (2, 17))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert in_forward == [1, 1] and torch.get_num_threads() == 2
    out.loss.backward()
    assert in_backward and set(in_backward) == {1}, in_backward
    assert torch.get_num_threads() == 2  # restored at the end of the backward pass


def test_large_stream_keeps_the_callers_threads(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "SMALL_STREAM_ELEMENTS", 16)
    model = tiny_mac()
    in_forward = record_block_threads(model, monkeypatch)
    tokens = torch.randint(0, 32, (2, 17))
    model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    assert in_forward == [2, 2] and torch.get_num_threads() == 2


def test_one_thread_restores_after_an_exception(two_threads):
    with pytest.raises(RuntimeError), threads.one_thread(True):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_results_equal_the_one_thread_run(two_threads):
    """The small model's loss and gradients at 2 threads equal those at 1 to fp32 round-off
    (the loss's backward still runs at the caller's setting)."""
    tokens = torch.randint(0, 32, (2, 17))
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        model = tiny_mac()
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        runs.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_backward_that_raises_gives_the_threads_back(two_threads):
    """A backward pass that raises never runs its queued callbacks. The caller's setting comes
    back at the model's next call (before: one thread for good, as the next forward saw one
    thread and so kept it), and ``threads.release()`` gives it back at once."""
    model, tokens = tiny_mac(), torch.randint(0, 32, (2, 17))

    def boom(grad):
        raise RuntimeError("boom")

    hook = model.embed.weight.register_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    assert torch.get_num_threads() == 1  # what the engine left behind
    hook.remove()
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert torch.get_num_threads() == 2
    out.loss.backward()
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        hook = model.embed.weight.register_hook(boom)
        model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    hook.remove()
    threads.release()
    assert torch.get_num_threads() == 2


def test_caller_policy_never_touches_the_threads(two_threads, monkeypatch):
    """``runtime.cpu_threads: caller``: blocks and memory loops run at the caller's setting."""
    torch.manual_seed(0)
    cfg = tiny_mac().cfg
    model = TitansLM(cfg, runtime=RuntimeConfig(cpu_threads="caller"))
    in_backward = record_backward_threads(monkeypatch)
    in_forward = record_block_threads(model, monkeypatch)
    tokens = torch.randint(0, 32, (2, 17))
    model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    assert in_forward == [2, 2] and set(in_backward) == {2}, (in_forward, in_backward)


def test_cpu_threads_names_the_bad_value():
    with pytest.raises(ValueError, match=r"runtime.cpu_threads='one'.*auto, caller"):
        RuntimeConfig(cpu_threads="one")
