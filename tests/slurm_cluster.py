"""A real single-node SLURM for tests: Debian's slurmctld, slurmd and munge, started as the
current (root) user with every file under one temp dir, on free ports, with a private munge
socket, so nothing on the host is touched and several test sessions can run side by side.

``python tests/slurm_cluster.py DIR`` starts one and prints the SLURM_CONF to export; Ctrl-C
stops it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "mungekey")

SLURM_CONF = """\
ClusterName=titans-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back this long (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmUnavailable(RuntimeError):
    """SLURM's Debian packages cannot be installed here; the message says why."""


def ensure_installed() -> None:
    """Install Debian's SLURM and munge packages when they are missing (needs root and apt)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(
            f"SLURM is not installed and Debian packages cannot be installed here "
            f"(root: {os.geteuid() == 0}, apt-get: {bool(shutil.which('apt-get'))}); "
            f"install {' '.join(PACKAGES)}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stderr}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but {missing} are still missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    dir: Path
    host: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job_field(self, job_id: str, name: str) -> str | None:
        """One field of `scontrol show job` (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for item in out.split():
            key, _, value = item.partition("=")
            if key == name:
                return value
        return None

    def wait_state(self, job_id: str, states: set[str], timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        parts = []
        for log in sorted(self.dir.glob("*.log")):
            parts.append(f"== {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, wait for them to leave, then stop the daemons (by their pids)."""
        if self.procs and self.procs[0].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
            for job in jobs:
                self.run("scancel", job, check=False)
            deadline = time.monotonic() + 60
            while jobs and time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i", check=False).split()
                if not out:
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def start(base: Path, cpus: int = 2, timeout: float = 120) -> Cluster:
    """Write slurm.conf under ``base`` and start munged, slurmctld and slurmd; wait until the
    node is idle. SlurmUnavailable: cannot install; RuntimeError (with the daemons' logs): it
    did not come up."""
    ensure_installed()
    base = Path(base)
    host = socket.gethostname().split(".")[0]
    for sub in ("state", f"spool/{host}", "munge"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "munge").chmod(0o700)
    munge_socket = base / "munge" / "munge.socket"
    conf = SLURM_CONF.format(
        host=host,
        dir=base,
        cpus=cpus,
        ctld_port=free_port(),
        slurmd_port=free_port(),
        munge_socket=munge_socket,
    )
    (base / "slurm.conf").write_text(conf)
    env = dict(os.environ, SLURM_CONF=str(base / "slurm.conf"))
    cluster = Cluster(base, host, env)
    key = base / "munge" / "munge.key"
    key.unlink(missing_ok=True)
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    key.chmod(0o400)
    munged = [
        "munged",
        "--foreground",
        "--force",
        f"--socket={munge_socket}",
        f"--key-file={key}",
        f"--pid-file={base / 'munge' / 'munged.pid'}",
        f"--log-file={base / 'munged.log'}",
        f"--seed-file={base / 'munge' / 'munged.seed'}",
    ]
    try:
        for cmd in (munged, ["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            log = open(base / f"{cmd[0]}.out.log", "w")  # noqa: SIM115 (lives with the daemon)
            cluster.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
            if cmd is munged:
                _wait_for(lambda: munge_socket.exists(), 20, "munged socket", cluster)
        _wait_for(lambda: _node_idle(cluster), timeout, "an idle node", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_idle(cluster: Cluster) -> bool:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
    return out == "idle"


def _wait_for(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{dead} exited" if dead else f"no {what} after {timeout} s"
            raise RuntimeError(f"SLURM did not start: {why}\n{cluster.logs()}")
        time.sleep(0.5)


if __name__ == "__main__":
    c = start(Path(sys.argv[1]).resolve())
    print(f"export SLURM_CONF={c.env['SLURM_CONF']}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        c.stop()
