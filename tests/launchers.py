"""Helpers for the launcher end-to-end tests (mpirun, Slurm): tool checks and process checks."""
from __future__ import annotations

import os
import shutil
import sys
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
    deadline = time.time() + timeout
    while True:
        left = processes_with(text)
        if not left or time.time() > deadline:
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


def complete(url: str) -> str:
    """One greedy completion of 6 tokens through the official openai client."""
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    out = client.completions.create(model="m", prompt="the quick brown fox", max_tokens=6, temperature=0)
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length", out
    return out.choices[0].text


def differing_files(a: Path, b: Path) -> list[str]:
    """Names of the files that differ between two folders (missing on one side, or other bytes)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file()
                                     and (a / n).read_bytes() == (b / n).read_bytes())]
