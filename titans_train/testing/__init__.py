"""Test support that ships with the package: contract models of GPU libraries for CPU tests
and for ``benchmarks/gpu_smoke.py --cpu-dry-run``."""
