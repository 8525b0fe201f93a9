"""Start a real `meshserve serve` process on loopback (alone or under a launcher) and stop it, for
end-to-end tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from tests.conftest import ROOT


class Server:
    """`meshserve serve *args --port 0`, or the full command line `command` (e.g. under mpirun); the
    URL comes from the "serving on" line of its output."""

    def __init__(self, *args, command: list | None = None, timeout: float = 300.0, env: dict | None = None):
        self.log: list[str] = []
        if command is None:
            command = [sys.executable, "-m", "orchestrator.cli", "serve", *args, "--port", "0"]
        self.proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "MESHSERVE_DEVICE": "cpu", **(env or {})})
        try:
            self.url = self._wait_for_url(timeout)
        except BaseException:
            self.kill()
            raise
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise AssertionError("server exited early:\n" + "".join(self.log))
                continue
            self.log.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                return m.group(1)
        raise AssertionError("server did not start:\n" + "".join(self.log))

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Kill the launcher and every process below it at once (cleanup after a failure)."""
        procs = self.descendants()
        for p in [self.proc, *procs]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait(30)
        psutil.wait_procs(procs, timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the launcher; returns its exit code after checking that no rank outlives it."""
        ranks = self.descendants()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        gone, alive = psutil.wait_procs(ranks, timeout=timeout)
        assert not alive, f"ranks left behind: {alive}"
        return code
