"""Test support that ships with the package: contract models of GPU libraries for CPU tests
and for ``benchmarks/gpu_smoke.py --cpu-dry-run``, and a tiny in-process recall trainer
(``recall_training``) for the learned-behaviour tests."""
