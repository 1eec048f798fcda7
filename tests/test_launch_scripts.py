"""The launchers' and the Makefile's decisions, without training: how many processes
launch/torchrun.sh starts (GPUs counted the way torch counts them; a fake nvidia-smi stands for a
GPU node), the CPUs launch/submit.sh asks SLURM for, and the GPU install target's guards."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from distributed import ROOT

LAUNCH = ROOT / "launch"
GPU_LIST = "\n".join(
    f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i}a2b3c4d-0000-1111-2222-33334444{i:04d})"
    for i in range(8)
)


def _load_visible_gpus():
    spec = importlib.util.spec_from_file_location("visible_gpus", LAUNCH / "visible_gpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


visible_gpus = _load_visible_gpus()


def fake_nvidia_smi(bindir, listing: str = GPU_LIST):
    """An `nvidia-smi` on PATH that lists a node's GPUs the way the real one does (-L)."""
    bindir.mkdir(exist_ok=True)
    script = bindir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}\nEOF\n")
    script.chmod(0o755)
    return bindir


def torchrun_dry(tmp_path, *, gpus: bool, **env: str) -> subprocess.CompletedProcess:
    """launch/torchrun.sh with DRY_RUN=1 (prints the torchrun command), on a node with or without
    8 (fake) GPUs, outside SLURM unless env says otherwise."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    base.pop("NPROC_PER_NODE", None)
    path = base["PATH"]
    if gpus:
        path = f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{path}"
    base.update(PATH=path, PYTHON=sys.executable, DRY_RUN="1", **env)
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), "--config", "x.yaml", "a=b"]
    return subprocess.run(cmd, capture_output=True, text=True, env=base, timeout=120)


def nproc(proc: subprocess.CompletedProcess) -> int:
    assert proc.returncode == 0, proc.stderr
    (flag,) = [w for w in proc.stdout.split() if w.startswith("--nproc-per-node=")]
    assert proc.stdout.rstrip().endswith("-m titans_train.cli --config x.yaml a=b")
    return int(flag.split("=")[1])


@pytest.mark.parametrize(
    "value",
    ["0,1", "1,0,3", "", "0,,1", "2,x,3", "1gpu2,2ampere", " 1, 3", "-1", "0,0", "+1,2", "3,-1,2"]
    + ["GPU-5d5b,GPU-7e", "MIG-ab,MIG-cd", "GPU-a,MIG-b", "GPU-a,GPU-a", "GPU-a,1"],
)
def test_cuda_visible_devices_parsed_as_torch_parses_it(value, monkeypatch):
    """Our parser against torch's own (private) one on the same strings."""
    parse = getattr(torch.cuda, "_parse_visible_devices", None)
    if parse is None:
        pytest.skip("torch.cuda._parse_visible_devices is gone in this torch")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus.parse_visible(value) == parse()


def test_visible_count_follows_torch_rules():
    uuids = [f"GPU-{c}{i}" for i, c in enumerate("abcdefgh")]
    assert visible_gpus.visible(None, uuids) == 8
    assert visible_gpus.visible("0,1", uuids) == 2
    assert visible_gpus.visible("", uuids) == 0
    assert visible_gpus.visible("1,9,2", uuids) == 1  # stops at the first device that is absent
    assert visible_gpus.visible("GPU-c2,GPU-a0", uuids) == 2  # UUID prefixes
    assert visible_gpus.visible("GPU-c2,GPU-zz,GPU-a0", uuids) == 1
    assert visible_gpus.visible("GPU-,GPU-a0", uuids) == 0  # ambiguous prefix


def test_mig_instances_replace_their_gpu(tmp_path, monkeypatch):
    listing = (
        "GPU 0: NVIDIA A100 (UUID: GPU-aaaa)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-m0)\n"
        "  MIG 3g.40gb     Device  1: (UUID: MIG-m1)\n"
        "GPU 1: NVIDIA A100 (UUID: GPU-bbbb)"
    )
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', listing)}:{os.environ['PATH']}")
    assert visible_gpus.nvidia_smi_uuids() == ["MIG-m0", "MIG-m1", "GPU-bbbb"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert visible_gpus.nvidia_smi_uuids() == []


def test_gpu_node_with_a_cpu_torch_stops_with_the_reason(tmp_path):
    """8 GPUs (nvidia-smi) but torch here is a CPU build: the old script started 8 ranks that
    would all train on CPU; now it stops and says why."""
    if torch.cuda.is_available():
        pytest.skip("torch can use CUDA here: it counts the real GPUs")
    proc = torchrun_dry(tmp_path, gpus=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "this node has GPUs (nvidia-smi lists 8) but torch" in proc.stderr
    assert "set NPROC_PER_NODE to run on CPU" in proc.stderr


def test_cuda_visible_devices_narrows_the_count(tmp_path):
    """CUDA_VISIBLE_DEVICES=0,1 on an 8-GPU node: 2 devices, not 8 (nvidia-smi -L counts 8)."""
    if torch.cuda.is_available():
        pytest.skip("torch can use CUDA here: it counts the real GPUs")
    proc = torchrun_dry(tmp_path, gpus=True, CUDA_VISIBLE_DEVICES="0,1")
    assert "nvidia-smi lists 8, 2 visible through CUDA_VISIBLE_DEVICES=0,1" in proc.stderr


def test_hidden_gpus_run_on_cpu(tmp_path):
    """CUDA_VISIBLE_DEVICES="" hides every GPU (torch's rule): a CPU run, one process."""
    proc = torchrun_dry(tmp_path, gpus=True, CUDA_VISIBLE_DEVICES="")
    assert nproc(proc) == 1


def test_cpu_machine_gets_one_process_and_says_so(tmp_path):
    proc = torchrun_dry(tmp_path, gpus=False)
    assert nproc(proc) == 1
    assert "1 process(es) on" in proc.stderr and "set NPROC_PER_NODE=N" in proc.stderr


def test_workers_bind_no_port_of_their_own_unless_the_group_can_restart(tmp_path, monkeypatch):
    """MAX_RESTARTS=0 (the default): the workers use the rendezvous store torchrun has bound
    (torch's default). An unshared store makes rank 0 bind a port torchrun picked free and released
    seconds before; a crash-consistency run in CI lost it to another process (EADDRINUSE). A group
    that can restart needs the fresh store (pytorch #135712), and a user's own setting is kept."""
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    plain = torchrun_dry(tmp_path, gpus=False, NPROC_PER_NODE="2")
    assert nproc(plain) == 2 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in plain.stdout
    restarts = torchrun_dry(tmp_path, gpus=False, NPROC_PER_NODE="2", MAX_RESTARTS="1")
    assert restarts.stdout.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")
    own = dict(MAX_RESTARTS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")
    assert torchrun_dry(tmp_path, gpus=False, **own).stdout.startswith(
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 "
    )


def test_slurm_cpus_and_explicit_count(tmp_path):
    assert nproc(torchrun_dry(tmp_path, gpus=False, SLURM_CPUS_ON_NODE="6", CPUS_PER_PROC="2")) == 3
    proc = torchrun_dry(tmp_path, gpus=True, NPROC_PER_NODE="3")
    assert nproc(proc) == 3 and "process(es) on" not in proc.stderr  # not counted, not printed


def submit_dry(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, DRY_RUN="1", **env)
    cmd = ["bash", str(LAUNCH / "submit.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=tmp_path, timeout=60)


def test_submit_asks_for_cpus(tmp_path):
    """The node's one task runs every rank and data worker: the job asks for CPUs explicitly."""
    out = submit_dry(tmp_path, "--gpus-per-node=8", "--", "--config", "x.yaml").stdout.split()
    assert "--exclusive" in out and "--gpus-per-node=8" in out
    assert out[-2:] == ["--config", "x.yaml"]
    out = submit_dry(tmp_path, "--config", "x.yaml", CPUS_PER_TASK="16").stdout.split()
    assert "--cpus-per-task=16" in out and "--exclusive" not in out
    for given in ("-c", "--cpus-per-task=4", "--cpus-per-gpu=8", "--exclusive=user"):
        out = submit_dry(tmp_path, given, "4", "--", "--config", "x.yaml").stdout.split()
        assert given in out and out.count("--exclusive") == (given == "--exclusive")
        assert not any(w.startswith("--cpus-per-task=") and w != given for w in out)
    assert "--exclusive" not in submit_dry(tmp_path, "x", CPUS_PER_TASK="none").stdout
    bad = submit_dry(tmp_path, "--config", "x.yaml", CPUS_PER_TASK="lots")
    assert bad.returncode == 2
    assert "CPUS_PER_TASK='lots': use exclusive, none or a number" in bad.stderr


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    cmd = [shutil.which("make"), "--no-print-directory", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full)


def test_install_gpu_builds_flash_attn_without_isolation_and_bounded():
    proc = make("-n", "install-gpu", "SKIP_INSTALL=1", f"VENV={sys.prefix}")
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if "-r requirements/gpu.txt" in x]
    assert "pip install --no-build-isolation" in line and line.startswith("MAX_JOBS=4 ")
    spec = [x for x in (ROOT / "requirements/gpu.txt").read_text().splitlines() if x[:1] != "#"]
    assert spec == ["flash-attn>=2.6,<2.9"]
    assert 'requirements("gpu.txt")' in (ROOT / "setup.py").read_text()


def test_install_gpu_refuses_a_cpu_torch():
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    proc = make("install-gpu", "SKIP_INSTALL=1", f"VENV={sys.prefix}")
    assert proc.returncode != 0
    assert f"torch {torch.__version__} in {sys.prefix} is not a CUDA build" in proc.stderr


def test_build_tools_checked_up_front(tmp_path):
    """The venv's bin/ comes first on make's PATH (its ninja is found with no other PATH); a
    missing compiler or ninja is named with the package to install."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    cxx = subprocess.run(["sh", "-c", "command -v c++"], capture_output=True, text=True).stdout
    if not cxx.strip():
        pytest.skip("no c++ on this machine")
    args = ("check-build-tools", f"VENV={venv}")
    missing = make(*args, CXX=cxx.strip(), PATH="/nonexistent")
    assert missing.returncode != 0
    assert f"make: no ninja in {venv}/bin or on PATH" in missing.stderr
    ninja = venv / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    assert make(*args, CXX=cxx.strip(), PATH="/nonexistent").returncode == 0
    nocxx = make(*args, CXX="no-such-c++")
    assert nocxx.returncode != 0
    assert "no C++ compiler ('no-such-c++' is not on PATH)" in nocxx.stderr
    assert "apt-get install g++" in nocxx.stderr


def test_sbatch_logs_the_requeue_before_slurm_can_end_it(tmp_path):
    """Once SLURM accepts `scontrol requeue` it ends the batch script, possibly before the
    script's next line (a CI run lost the log line that way). Fake srun (the step stops for a
    requeue: 85) and scontrol (a requeue kills its caller at once): the log still says so."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/bash\nexit 85\n")
    scontrol = (
        '#!/bin/bash\n[ "$1" = show ] && echo node0\n[ "$1" = requeue ] && kill -KILL $PPID\n'
    )
    (bindir / "scontrol").write_text(scontrol)
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TITANS_ROOT=str(ROOT))
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node0")
    env.update(SLURM_CPUS_PER_TASK="2")
    cmd = ["bash", str(LAUNCH / "slurm.sbatch")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stdout + proc.stderr  # the requeue ended it
    assert "training step exited with 85" in proc.stdout
    assert "slurm.sbatch: requeueing job 7;" in proc.stdout, proc.stdout
