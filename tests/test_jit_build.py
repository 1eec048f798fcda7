"""One DeepSpeed JIT cache and one ninja per Python environment (titans_train/jit_build.py), and
the line printed before DeepSpeed's silent C++ build."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from titans_train import jit_build

IN_VENV = sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK)


def test_importing_titans_train_sets_a_per_environment_cache():
    """Any entry point (make, the launchers, an activated venv, bare python) gets the same
    TORCH_EXTENSIONS_DIR, chosen by the interpreter's environment, and its ninja first."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["PATH"] = "/usr/bin:/bin"  # the venv not activated
    code = "import os, titans_train; print(os.environ['TORCH_EXTENSIONS_DIR'], os.environ['PATH'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    cache, path = out.stdout.split()
    assert cache == jit_build.default_extensions_dir()
    if IN_VENV:
        assert cache == str(Path(sys.prefix) / "torch_extensions")
    if (Path(sys.prefix) / "bin" / "ninja").is_file() and IN_VENV:
        assert path.split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")


def test_a_cache_set_by_the_user_is_kept(tmp_path):
    environ = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "PATH": "/bin"}
    jit_build.apply_defaults(environ)
    assert environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)
    jit_build.apply_defaults(environ)  # idempotent: PATH does not grow
    assert environ["PATH"].count("/bin") == len(environ["PATH"].split(os.pathsep))


def test_outside_a_venv_the_cache_is_keyed_on_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env-a"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "env-a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = jit_build.default_extensions_dir()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env-b"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "env-b"))
    b = jit_build.default_extensions_dir()
    assert a != b and Path(a).parent == Path(b).parent == tmp_path / "cache" / "torch_extensions"


def test_notice_before_an_uncached_build(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shm_comm op is built by DeepSpeed's CPU accelerator only")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    notice = jit_build.pending_build_notice()
    assert notice.startswith(
        f"DeepSpeed is compiling its C++ op deepspeed_shm_comm into {tmp_path}"
    )
    built = tmp_path / "deepspeed_shm_comm"
    built.mkdir()
    (built / "deepspeed_shm_comm.so").write_bytes(b"")  # what torch leaves after the build
    assert jit_build.pending_build_notice() is None
