"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd started from a temporary
folder (its own munge key and socket, slurm.conf, state, spool, logs and free ports), nothing installed
system-wide. The node declares enough CPUs for a 4-rank job (slurmd keeps the configured count).

Job ids start at a random FirstJobId, so the rendezvous port that a job derives from its id
(29500 + id % 10000) differs from run to run; ids start within 1000-1999 (ports 30500-31499, plus
the few jobs of a run), below the ports the OS hands out by itself (32768 and up)."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.launchers import SBIN_PATH, unused_port


def common_settings(munge_socket) -> list[str]:
    """slurm.conf lines every test cluster shares: root daemons, munge, no cgroups or accounting."""
    return ["SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "ReturnToService=2", "SlurmdParameters=config_overrides",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "KillWait=15"]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 8):
        self.root = root  # each start attempt works in a folder of its own below it
        self.node = socket.gethostname().split(".")[0]
        self.dir = self.conf = None
        self.env = dict(os.environ, PATH=SBIN_PATH)
        self._procs: list[subprocess.Popen] = []
        self._cpus = cpus
        self.first_job_id = random.randrange(1000, 2000)

    def start(self, timeout: float = 60.0, attempts: int = 3) -> SlurmCluster:
        """Start the daemons; when one of them exits or the node does not come up (say, a port was
        taken meanwhile), start over with fresh ports and state, up to `attempts` times."""
        for attempt in range(1, attempts + 1):
            self.dir = self.root / f"attempt{attempt}"
            self.conf = self.dir / "slurm.conf"
            self.env["SLURM_CONF"] = str(self.conf)
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if attempt == attempts:
                    raise
                self.stop()
        raise AssertionError("unreachable")

    def _start_controller(self, timeout: float) -> None:
        """The folders, munged with a fresh key, slurm.conf and slurmctld (the node daemons are next)."""
        r = self.dir
        for sub in ("state", "spool", "logs"):
            (r / sub).mkdir(parents=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge.sock"
        self._spawn("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={r / 'munged.pid'}", f"--seed-file={r / 'munged.seed'}",
                    f"--log-file={r / 'logs' / 'munged.log'}")
        self._wait(lambda: sock.exists(), timeout, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(sock))
        self._spawn("slurmctld", "-D", "-f", str(self.conf))

    def _start_once(self, timeout: float) -> SlurmCluster:
        self._start_controller(timeout)
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
                   timeout, "the Slurm node did not become idle")
        return self

    def _slurm_conf(self, munge_socket: Path) -> str:
        r = self.dir
        return "\n".join([
            "ClusterName=meshserve-test",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={unused_port()}",
            f"SlurmdPort={unused_port()}",
            f"FirstJobId={self.first_job_id}",
            *common_settings(munge_socket),
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'logs' / 'slurmd.log'}",
            f"NodeName={self.node} CPUs={self._cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    def _spawn(self, *cmd: str) -> None:
        log = open(self.dir / "logs" / f"{cmd[0]}.out", "w")
        self._procs.append(subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        """Poll `ready` until it holds; fail at the deadline, or at once when a daemon has exited."""
        deadline = time.monotonic() + timeout
        while not ready():
            exited = [p.args[0] for p in self._procs if p.poll() is not None]
            if exited:
                raise RuntimeError(f"{what}: {', '.join(exited)} exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f}s")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.dir / "logs").glob("*")))

    def stop(self) -> None:
        """Cancel what is left, then stop slurmd, slurmctld and munged (in that order)."""
        if self.conf is not None and self.conf.exists():
            self.run("scancel", "--full", "--partition=test", check=False)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._procs.clear()
