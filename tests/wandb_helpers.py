"""Helpers for tests that run the real wandb offline: isolated WANDB_* dirs and env, the
run's .wandb transaction log read back with wandb's own reader, and a proxy trap that shows
whether wandb tried to reach a server."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

from distributed import ROOT


def wandb_home(base: Path) -> dict[str, str]:
    """WANDB_DIR/CACHE_DIR/CONFIG_DIR/DATA_DIR under `base`, so nothing lands in $HOME."""
    names = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    return {name: str(base / name.lower()) for name in names}


def clean_env(**env: str) -> dict[str, str]:
    """os.environ without any WANDB_* (notably WANDB_SERVICE, which wandb exports once it runs
    here and which would make a child reuse this process's wandb service), plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return dict(base, WANDB_SILENT="true", **env)


def read_records(run_path: Path) -> list[dict]:
    """Every record of the run's .wandb transaction log, decoded by wandb itself."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_path)]
    with tempfile.TemporaryDirectory() as home:  # the reader's own debug log goes here
        env = clean_env(**wandb_home(Path(home)))
        env.update(WANDB_MODE="offline", WANDB_ERROR_REPORTING="false")  # no telemetry upload
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_record(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run


def history(records: list[dict]) -> dict[int, dict]:
    """step -> the history row, as W&B will upload it."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return {row.get("_step", 0): row for row in rows}


def run_script(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = clean_env(**env)
    full_env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-c", textwrap.dedent(code), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def files_under(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*") if p.is_file()]


@contextmanager
def connection_trap():
    """A local TCP listener used as HTTP(S) proxy: any request wandb tries to make shows up.
    It answers 401, which makes an online wandb.init give up at once instead of retrying."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    hits: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                request = b""
                try:
                    request = conn.recv(200)
                    conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass
                hits.append(request)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", hits
    finally:
        stop.set()
        thread.join()
        server.close()
