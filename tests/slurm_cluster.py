"""A one-node Slurm cluster on this machine, for tests: munged, slurmctld, slurmd.

Everything lives in one temporary folder (config, state, spool, logs, munge
socket), the daemons listen on 127.0.0.1 only, and they run in the foreground as
children of the test, so they are stopped by pid even when a test fails.

Requeued jobs wait `AuthInfo=cred_expire` seconds before they may start again
(Slurm's BeginTime); it is set to its minimum here, and the scheduler looks at
pending jobs every second, so a requeued job starts again within seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
CRED_EXPIRE_S = 5  # Slurm refuses less; a requeued job waits this long to start again

SLURM_CONF = """\
ClusterName=pipeline-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
# Bind to the node's address (127.0.0.1), not to every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


# Daemons live in /usr/sbin, which a user's PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])


def missing_binaries() -> list[str]:
    """The Slurm and munge programs not found on PATH or in /usr/sbin."""
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SEARCH_PATH) is None]


class SlurmCluster:
    """A running one-node cluster; `env` is what Slurm commands must run with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}
        self.daemons: dict[str, subprocess.Popen] = {}

    def run(self, *args: str, timeout_s: float = 30, check: bool = True,
            env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster (SLURM_CONF set), under a timeout."""
        return subprocess.run(args, env={**self.env, **(env or {})}, cwd=cwd, check=check,
                              capture_output=True, text=True, timeout=timeout_s)

    def sbatch(self, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> str:
        """Submit a batch job; return its id."""
        return self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for_job(self, job_id: str, states: set[str], timeout_s: float,
                     poll_s: float = 1.0) -> dict[str, str]:
        """Poll until the job reaches one of `states`; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        info = self.job(job_id)
        while info.get("JobState") not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after "
                                   f"{timeout_s} s: {info.get('JobState')}\n{self.logs()}")
            time.sleep(poll_s)
            info = self.job(job_id)
        return info

    def logs(self) -> str:
        """The tail of every daemon's log, for failure messages."""
        parts = []
        for path in [*sorted((self.root / "log").iterdir()), self.root / "munge" / "munged.log"]:
            if not path.is_file():
                continue
            lines = path.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def start(self, timeout_s: float = 60) -> None:
        self._write_config()
        self._start_munge()
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_until_idle(timeout_s)

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel what still runs, then stop the daemons (newest first) by pid."""
        if "slurmctld" in self.daemons:
            try:
                self.run("scancel", "--full", "--partition=debug", check=False)
                self._wait_for_no_jobs(timeout_s)
            except (subprocess.TimeoutExpired, TimeoutError):
                log.warning("jobs still in the queue when stopping the cluster")
        for name, proc in reversed(list(self.daemons.items())):
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait(timeout=timeout_s)
        self.daemons.clear()

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(SLURM_CONF.format(
            node=self.node, root=self.root, cpus=os.cpu_count(),
            # slurmd drains a node that has less memory than configured
            memory_mib=int(memory_mib * 0.9), cred_expire=CRED_EXPIRE_S,
            ctld_port=free_port(), slurmd_port=free_port()))

    def _start_munge(self) -> None:
        # munged refuses to run as root, and wants folders only the munge user may write
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)
        shutil.chown(munge, "munge", "munge")
        self._start("munged", [
            "munged", "--foreground", f"--socket={munge}/munge.socket",
            f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
            f"--seed-file={munge}/munged.seed", "--origin=127.0.0.1",
        ], user="munge")
        socket_path = munge / "munge.socket"
        wait_until(socket_path.exists, 10, f"munged made no socket: {self.logs()}")

    def _start(self, name: str, argv: list[str], user: str | None = None) -> None:
        log_path = self.root / "log" / f"{name}.out"
        with open(log_path, "w") as out:
            self.daemons[name] = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                user=user, group=user, extra_groups=[] if user else None)

    def _wait_until_idle(self, timeout_s: float) -> None:
        def idle() -> bool:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            out = self.run("sinfo", "--noheader", "--Node", "--format=%t", check=False)
            return out.stdout.strip() == "idle"

        wait_until(idle, timeout_s, f"node not idle after {timeout_s} s:\n{self.logs()}")

    def _wait_for_no_jobs(self, timeout_s: float) -> None:
        def empty() -> bool:
            out = self.run("squeue", "--noheader", "--format=%i", check=False)
            return out.returncode != 0 or not out.stdout.strip()

        wait_until(empty, timeout_s, "jobs still running")


def wait_until(ready, timeout_s: float, message: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(poll_s)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def slurm_cluster(timeout_s: float = 60) -> Iterator[SlurmCluster]:
    """Start a cluster in a fresh temporary folder; stop it and remove the folder after."""
    # Not under pytest's tmp_path: its folders are private to root, and munged runs
    # as the munge user, which must reach its socket folder.
    root = Path(tempfile.mkdtemp(prefix="pipeline-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start(timeout_s)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
