"""Helpers for the launcher end-to-end tests (mpirun, Slurm, Ray, torchrun): tool checks, process
checks, ports, and the local run that every launched run must reproduce token for token."""
from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])


def require_tools(*names: str, modules: tuple[str, ...] = ()) -> None:
    """Skip (or, with MESHSERVE_REQUIRE_LAUNCHERS=1, fail) when a tool or Python module is missing."""
    missing = [n for n in names if shutil.which(n, path=SBIN_PATH) is None]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python module {module}")
    if missing:
        unavailable(f"missing {', '.join(missing)} (apt-get install -y openmpi-bin libopenmpi-dev slurm-wlm "
                    "munge; pip install -e '.[mpi]')")


def unavailable(why: str) -> None:
    """Skip the test, unless MESHSERVE_REQUIRE_LAUNCHERS=1 (CI): then fail it."""
    if os.environ.get("MESHSERVE_REQUIRE_LAUNCHERS") == "1":
        pytest.fail(f"MESHSERVE_REQUIRE_LAUNCHERS=1 but {why}", pytrace=False)
    pytest.skip(why)


def meshserve_command() -> str:
    """The `meshserve` console script of this Python environment."""
    script = Path(sys.executable).parent / "meshserve"
    return str(script) if script.exists() else (shutil.which("meshserve") or "meshserve")


def launch_env(**extra) -> dict:
    """The environment for launched ranks: CPU ranks, this venv's scripts first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), SBIN_PATH])
    return dict(os.environ, PATH=path, MESHSERVE_DEVICE="cpu", **extra)


def processes_with(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (e.g. a test's own config path)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_gone(text: str, timeout: float) -> list[psutil.Process]:
    """Wait until no process mentions `text`; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_with(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def write_config(path: Path, *, source: Path | None = None, engine_dir: Path, tp: int, pp: int,
                 host: str = "127.0.0.1") -> Path:
    """A meshserve YAML config for a tiny test model, served as "m" on a free port."""
    lines = ["model:", f"  engine_dir: {engine_dir}", "  name: m"]
    if source is not None:
        lines.append(f"  source: {source}")
    lines += ["parallel:", f"  tp: {tp}", f"  pp: {pp}",
              "engine:", "  dtype: float32", "  max_batch_size: 8", "  max_seq_len: 256", "  max_num_tokens: 48",
              "  kv_block_size: 8",
              "server:", f"  host: {host}", "  port: 0"]
    path.write_text("\n".join(lines) + "\n")
    return path


PROMPT = "the quick brown fox"
MAX_TOKENS = 6


def generate_requests(tmp: Path) -> Path:
    """A JSONL input asking for the greedy completion of PROMPT."""
    from tests.conftest import write_jsonl
    return write_jsonl(tmp / "generate-in.jsonl", [{"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}])


def generated(output: Path) -> dict:
    """The one row of a `meshserve generate` output, in the shape of `complete` (compare with ==)."""
    from tests.conftest import read_jsonl
    [row] = read_jsonl(output)
    return {"text": row["text"], "finish_reason": row["finish_reason"], "completion_tokens": len(row["token_ids"])}


def local_completion(engine: Path, tmp: Path) -> dict:
    """The greedy completion of PROMPT by a local `meshserve generate` on `engine` (ranks spawned on
    this machine, no launcher): the reference a launched run must match exactly."""
    from tests.conftest import meshserve
    meshserve("generate", "--engine", engine, "--input", generate_requests(tmp), "--output",
              tmp / "reference-out.jsonl", "--quiet", timeout=300)
    row = generated(tmp / "reference-out.jsonl")
    assert row["completion_tokens"] == MAX_TOKENS and row["finish_reason"] == "length" and row["text"], row
    return row


def complete(url: str) -> dict:
    """The greedy completion of PROMPT through the official openai client, in the shape of
    `local_completion` (compare the two with ==)."""
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    return {"text": out.choices[0].text, "finish_reason": out.choices[0].finish_reason,
            "completion_tokens": out.usage.completion_tokens}


def error_messages(text: str) -> list[str]:
    """Each "meshserve: error: " message in a launcher's output, without the prefix. Launchers pass
    several ranks' output through one pipe, so two ranks' lines can arrive joined: split on the
    prefix, not on lines."""
    return [part.splitlines()[0].strip() for part in text.split("meshserve: error: ")[1:]]


def unused_port() -> int:
    """A port that is free now, below Linux's default ephemeral range (32768-60999), so no port the
    OS hands out by itself takes it before the server that it is meant for binds it."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


class OutputLines:
    """The merged stdout/stderr lines of a subprocess, read on a thread so that every wait has a
    real deadline, even when the process falls silent."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._cond = proc, [], threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # end of output
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(line for line in self.lines if line is not None)

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match:
        """The first line that matches `pattern`; fails at the deadline or when the output ends first."""
        pattern = re.compile(pattern)
        deadline, seen = time.monotonic() + timeout, 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        raise AssertionError(f"the output ended (exit {self.proc.poll()}) before a line "
                                             f"matching {pattern.pattern!r}:\n{self.text()}")
                    m = pattern.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout:.0f}s:\n{self.text()}")
                self._cond.wait(left)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process has exited and its output is read to the end."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process and everything below it (cleanup after a failed test)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(tree, timeout=30)


def differing_files(a: Path, b: Path) -> list[str]:
    """Names of the files that differ between two folders (missing on one side, or other bytes)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file()
                                     and (a / n).read_bytes() == (b / n).read_bytes())]
