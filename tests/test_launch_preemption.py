"""preemption.py in one process: real signals set the flags, the reasons are named, the exit
follows the launcher's contract; and the launch.* config checks."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from distributed import ROOT

from titans_train import distributed
from titans_train.config import ConfigError
from titans_train.config_load import load_config

EXPERIMENT = ROOT / "configs" / "experiments" / "tiny_mac.yaml"


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter, so installing signal handlers leaves pytest's own alone."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "TITANS_EXIT_FILE")
    }
    full_env.update(PYTHONPATH=str(ROOT), **env)
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=120)


def test_signals_set_flags_that_name_their_reason():
    proc = run(
        """
        import os, signal
        from titans_train.preemption import Preemption
        p = Preemption(rank=0, walltime_margin=300)
        assert p.should_stop() is None
        assert p.seconds_left() is None  # no SLURM job: no wall-time guard
        os.kill(os.getpid(), signal.SIGTERM)   # would end the process without the handler
        print(p.should_stop())
        os.kill(os.getpid(), signal.SIGUSR1)
        print(p.should_stop())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["SIGTERM", "SIGUSR1, SIGTERM"]


@pytest.mark.parametrize("exit_file", [False, True])
def test_exit_for_requeue_follows_the_launcher(tmp_path, exit_file):
    """85 on its own; under torchrun.sh (TITANS_EXIT_FILE) 0 plus the reason in the file."""
    env = {"TITANS_EXIT_FILE": str(tmp_path / "exit")} if exit_file else {}
    proc = run(
        """
        from titans_train.preemption import exit_for_requeue
        exit_for_requeue("SIGUSR1", step=7, local_rank=0)
        """,
        **env,
    )
    if exit_file:
        assert proc.returncode == 0
        assert (tmp_path / "exit").read_text() == "requeue step=7 reason=SIGUSR1\n"
    else:
        assert proc.returncode == 85


def test_failure_message_names_the_rank():
    from titans_train.distributed import DistEnv, failure_message

    msg = failure_message(DistEnv(3, 8, 1), 12, RuntimeError("Timed out waiting 600000ms"))
    assert msg.startswith("rank 3/8 (host ")
    assert f"pid {os.getpid()}) failed in step 12: RuntimeError: Timed out" in msg


def test_launch_config_is_checked(demo_shards):
    overrides = [f"data.train=[{demo_shards}]", "train.seq_len=128"]
    cfg = load_config(EXPERIMENT, overrides + ["launch.walltime_margin=0", "launch.timeout=30"])
    assert cfg.launch.walltime_margin == 0 and cfg.launch.timeout == 30
    with pytest.raises(ConfigError, match="launch: timeouts"):
        load_config(EXPERIMENT, overrides + ["launch.timeout=0"])
    with pytest.raises(ConfigError, match="walltime"):
        load_config(EXPERIMENT, overrides + ["launch.walltime=5"])


def test_children_ignore_stop_signals():
    """Subprocesses the trainer starts (squeue, the universal conversion) ignore USR1/TERM."""
    proc = run(
        """
        import signal, subprocess, sys
        from titans_train.preemption import ignore_stop_signals
        out = subprocess.run(
            [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGTERM))"],
            capture_output=True, text=True, preexec_fn=ignore_stop_signals,
        ).stdout
        print(out.strip())
        """
    )
    assert proc.stdout.strip() == str(signal.SIG_IGN)


def test_a_save_longer_than_half_the_walltime_margin_is_warned_about():
    from titans_train.preemption import thin_margin_warning

    assert thin_margin_warning(save_seconds=40, margin=300) is None
    assert thin_margin_warning(save_seconds=200, margin=0) is None  # no guard, nothing to say
    warning = thin_margin_warning(save_seconds=200, margin=300)
    assert "took 200 s" in warning and "launch.walltime_margin=300" in warning
    assert "e.g. to 600" in warning


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_a_lone_process_takes_a_free_port_a_launched_one_keeps_its_own(monkeypatch):
    """Without a launcher the rendezvous port was always 29500, so a second single-process run
    on the host (or a test next to another) failed with EADDRINUSE."""
    for name in (*LAUNCH_VARS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.setenv(name, "")  # recorded, so whatever env_from_launcher sets is undone
        monkeypatch.delenv(name)
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", 29500))
            held.listen()
        except OSError:
            pass  # something else already holds it: the point stands
        distributed.env_from_launcher()
        port = int(os.environ["MASTER_PORT"])
        assert port != 29500
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # it is free
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29611")
    distributed.env_from_launcher()
    assert os.environ["MASTER_PORT"] == "29611"
