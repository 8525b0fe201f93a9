"""A real Slurm cluster over namespace nodes (tests/netns.py): munged and slurmctld on this machine
(the controller on the bridge's address), one slurmd per node in that node's namespace, under its host
name, declared with NodeAddr = the node's address. Otherwise as tests/slurm_cluster.py."""
from __future__ import annotations

import socket
import subprocess

from tests.netns import NetnsCluster
from tests.slurm_cluster import SlurmCluster, common_settings


class NetnsSlurm(SlurmCluster):
    def __init__(self, root, nodes: NetnsCluster, cpus: int = 4):
        super().__init__(root, cpus)
        self.nodes = nodes
        self.node = nodes.nodes[0].name  # the first node, where batch scripts run

    def _start_once(self, timeout: float) -> SlurmCluster:
        r = self.dir
        self._start_controller(timeout)
        for node in self.nodes.nodes:
            (r / "spool" / node.name).mkdir()
        for node in self.nodes.nodes:
            log = open(r / "logs" / f"slurmd-{node.name}.out", "w")
            slurmd = node.command("slurmd", "-D", "-f", self.conf, "-N", node.name, keep_sys=True)
            self._procs.append(subprocess.Popen(slurmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))
            log.close()
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.split() == ["idle"],
                   timeout, "the Slurm nodes did not become idle")
        return self

    def _slurm_conf(self, munge_socket) -> str:
        r = self.dir
        names = ",".join(n.name for n in self.nodes.nodes)
        return "\n".join([
            "ClusterName=meshserve-netns",
            f"SlurmctldHost={socket.gethostname()}({self.nodes.gateway})",
            f"SlurmctldPort={self._port()}", f"SlurmdPort={self._port()}",
            f"FirstJobId={self.first_job_id}",
            *common_settings(munge_socket),
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'spool'}/%n/slurmd.pid",
            f"SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'logs'}/slurmd-%n.log",
            *[f"NodeName={n.name} NodeAddr={n.address} CPUs={self._cpus} RealMemory=4000 State=UNKNOWN"
              for n in self.nodes.nodes],
            f"PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    @staticmethod
    def _port() -> int:
        from tests.launchers import unused_port
        return unused_port()
