"""MFU's datasheet peak: each GPU variant gets its own, not the first substring match."""

import pytest
import torch

from titans_train import metrics


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
    ],
)
def test_peak_per_gpu_variant(monkeypatch, name, tflops):
    monkeypatch.setattr(metrics, "device_type", lambda: "cuda")  # the accelerator decides
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = metrics.peak_flops_per_device()
    assert peak == tflops * 1e12, source


def test_unknown_gpu_asks_for_the_peak(monkeypatch):
    monkeypatch.setattr(metrics, "device_type", lambda: "cuda")  # the accelerator decides
    monkeypatch.setattr(
        torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080"
    )
    assert metrics.peak_flops_per_device() == (
        0.0,
        "unknown GPU 'NVIDIA GeForce GTX 1080': set train.peak_tflops",
    )
