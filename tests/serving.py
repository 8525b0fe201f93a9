"""Start a real `meshserve serve` process on loopback (alone or under a launcher) and stop it, for
end-to-end tests."""
from __future__ import annotations

import os
import queue
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
    URL comes from the "serving on" line of its output. A reader thread collects the output into
    `log`, so every wait here has a deadline even when the server falls silent."""

    def __init__(self, *args, command: list | None = None, timeout: float = 300.0, env: dict | None = None):
        self.log: list[str] = []
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        if command is None:
            command = [sys.executable, "-m", "meshserve", "serve", *args, "--port", "0"]
        self.proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "MESHSERVE_DEVICE": "cpu", **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            # (host and port only: under a launcher another rank's output may follow on the same line)
            self.url = self.wait_for(r"serving on (http://[A-Za-z0-9_.\-\[\]:]+)", timeout).group(1)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The next output line (after those already waited for) that matches `pattern`; fails at
        the deadline, or when the output ends first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n" + "".join(self.log))
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                self.proc.wait(30)
                raise AssertionError(f"the server exited ({self.proc.returncode}) before printing a line "
                                     f"matching {pattern!r}:\n" + "".join(self.log))
            m = re.search(pattern, line)
            if m:
                return m

    @property
    def output(self) -> str:
        return "".join(self.log)

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
        self._reader.join(10)

    def wait(self, timeout: float) -> int:
        """The exit code once the server exits by itself, its output read to the end."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the launcher; returns its exit code after checking that no rank outlives it."""
        ranks = self.descendants()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        gone, alive = psutil.wait_procs(ranks, timeout=timeout)
        assert not alive, f"ranks left behind: {alive}"
        self._reader.join(timeout)
        return code


def build_small_engine(root, tp: int = 1, pp: int = 1, max_seq_len: int = 512):
    """A tiny random Llama with the demo tokenizer built for tp x pp ranks (float32, 4 sequences,
    `max_seq_len` tokens, 16-token blocks) under root/engine: what the restart and fault tests serve."""
    from tests.checkpoints import write_llama_with_demo_tokenizer
    from tests.conftest import meshserve
    hf = write_llama_with_demo_tokenizer(root / "hf", max_position_embeddings=max_seq_len)
    out = root / "engine"
    meshserve("build", "--model", hf, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", out,
              "--max-seq-len", max_seq_len, "--max-batch-size", 4, "--kv-block-size", 16, "--quiet")
    return out


def serve_random_llama(tmp, seed: int, *build_args, chat_template: str | None = None):
    """A tiny random Llama with the demo tokenizer (and its chat template, or `chat_template`), built
    with `build_args` and served as "m": yields (server, its transformers tokenizer) and checks the
    server stops cleanly. A generator for module fixtures to `yield from`."""
    from transformers import AutoTokenizer

    from tests.checkpoints import write_llama_with_demo_tokenizer
    from tests.conftest import meshserve
    hf = write_llama_with_demo_tokenizer(tmp / "hf", seed=seed, chat_template=chat_template)
    meshserve("build", "--model", hf, "--dtype", "float32", *build_args, "--out", tmp / "engine", "--quiet")
    server = Server("--engine", tmp / "engine", "--model-name", "m")
    try:
        yield server, AutoTokenizer.from_pretrained(hf)
    finally:
        assert server.stop() == 0, server.output
