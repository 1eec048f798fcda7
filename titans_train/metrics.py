"""Throughput, MFU, data-wait share and memory for the training log."""

from __future__ import annotations

import resource
import sys
import time

import torch

from titans_train.distributed import device_type
from titans_train.models import ModelConfig
from titans_train.models.flops import flops_per_token

# Dense bf16 peak per device (no sparsity; NVIDIA datasheets), for MFU on known GPUs. A key
# matches when all its words are words of torch.cuda.get_device_name(); the key with the most
# words wins, so "NVIDIA H100 PCIe" gets the PCIe peak, not the SXM one ("NVIDIA H100 80GB
# HBM3"), and "L4" does not match "L40S".
GPU_PEAK_TFLOPS = {
    "H100": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H200 NVL": 835.0,
    "A100": 312.0,  # SXM and PCIe alike
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def gpu_peak_tflops(name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 TFLOP/s) for a CUDA device name, or None if it is not listed."""
    words = set(name.replace("-", " ").lower().split())
    hits = [key for key in GPU_PEAK_TFLOPS if set(key.lower().split()) <= words]
    if not hits:
        return None
    key = max(hits, key=lambda k: len(k.split()))
    return key, GPU_PEAK_TFLOPS[key]


def peak_flops_per_device(override_tflops: float | None = None) -> tuple[float, str]:
    """(FLOP/s, how it was obtained). On CPU: a measured fp32 matmul rate on this process's
    threads, so CPU "MFU" is the share of what this machine's matmuls reach, not of a datasheet."""
    if override_tflops:
        return override_tflops * 1e12, "config train.peak_tflops"
    if device_type() == "cuda":
        name = torch.cuda.get_device_name()
        hit = gpu_peak_tflops(name)
        if hit:
            return hit[1] * 1e12, f"datasheet bf16 peak of {hit[0]}"
        return 0.0, f"unknown GPU {name!r}: set train.peak_tflops"
    return measured_cpu_flops(), "measured fp32 matmul rate"


def measured_cpu_flops(n: int = 1024, seconds: float = 0.3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_memory_gb() -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device_type() == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class StepMeter:
    """Accumulates step and data-wait time between log calls; turns them into rates."""

    def __init__(self, model_cfg: ModelConfig, seq_len: int, world_size: int, peak_flops: float):
        self.train_flops_per_token = 3 * flops_per_token(model_cfg, seq_len)["total"]
        self.world_size, self.peak_flops = world_size, peak_flops
        self.reset()

    def reset(self) -> None:
        self.steps, self.tokens, self.step_time, self.data_time = 0, 0, 0.0, 0.0

    def add(self, tokens: int, step_time: float, data_time: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.step_time += step_time
        self.data_time += data_time

    def rates(self) -> dict[str, float]:
        if not self.steps or self.step_time <= 0:
            return {}
        tps = self.tokens / self.step_time
        out = {
            "tokens_per_second": tps,
            "tokens_per_second_per_rank": tps / self.world_size,
            "data_wait_share": self.data_time / self.step_time,
            "step_seconds": self.step_time / self.steps,
            "peak_memory_gb": peak_memory_gb(),
        }
        if self.peak_flops > 0:
            out["mfu"] = tps * self.train_flops_per_token / (self.peak_flops * self.world_size)
        return out
