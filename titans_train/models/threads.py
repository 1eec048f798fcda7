"""One intra-op thread for a small model on CPU, in forward and backward (issue 16).

A small model's ops are too small for a second thread: in the tiny MAC of
``benchmarks/bench_small.py`` (batch 16 x 128 tokens, width 64) only ~18 % of a one-thread step's
CPU time is in ops that open an OpenMP region at two threads (the rest is below aten's grain
sizes, or in the memory's chunk loop, already on one thread: ``memory_scan.loop_threads``), so two
threads can gain at most ~1.1x, and the ~1,000 forks and joins a step cost about that back: on a
quiet machine the step took 0.351 s at two threads and 0.326 s at one (docs/benchmarks.md). On a
loaded machine each join waits for a descheduled thread, and two threads were 5-8x slower than
one. The peer measured there (titans-pytorch) has ~68 % of its step in forking ops.

Below ``SMALL_STREAM_ELEMENTS`` (batch x tokens x width of the residual stream) the model runs
on one thread: the forward under ``one_thread``, the backward from ``OneThreadBackward`` (on the
logits: only the loss's backward keeps the caller's threads) to the end of the backward pass,
where a queued callback restores the caller's setting. Results are those of one thread.

A backward pass that raises never runs its queued callbacks. The setting it took is kept here
(``_held``) and given back by ``release()``, which the model's next forward calls first; without
it the next forward would see one thread and keep it for good. ``runtime.cpu_threads: caller``
turns all of this off (``RuntimeConfig``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# The tiny MAC's residual stream, 16 x 128 x 64: the largest size measured to gain nothing from
# a second thread. Larger models keep the caller's threads.
SMALL_STREAM_ELEMENTS = 1 << 17

# The caller's thread count while a backward pass runs on one thread; None when nothing is held.
_held: int | None = None


def release() -> None:
    """Give back the thread count a backward pass took and did not restore (it raised)."""
    global _held
    if _held is not None:
        torch.set_num_threads(_held)
        _held = None


def small_on_cpu(x: Tensor) -> bool:
    """Whether the model over the residual stream ``x`` runs on one thread."""
    return (
        x.device.type == "cpu"
        and x.numel() <= SMALL_STREAM_ELEMENTS
        and torch.get_num_threads() > 1
    )


@contextlib.contextmanager
def at_count(n: int):
    """``n`` intra-op threads inside (a recompute at its forward's count), the caller's after."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def one_thread(active: bool) -> contextlib.AbstractContextManager:
    """One intra-op thread inside if ``active``, the caller's setting after (also on an
    exception)."""
    return at_count(1) if active else contextlib.nullcontext()


class OneThreadBackward(torch.autograd.Function):
    """Identity; its backward sets one thread for the rest of the backward pass (everything
    that runs after it: the head and the blocks) and queues the restore for the pass's end."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        global _held
        old = torch.get_num_threads()
        if old > 1:
            _held = old
            torch.set_num_threads(1)
            torch.autograd.Variable._execution_engine.queue_callback(release)
        return g
