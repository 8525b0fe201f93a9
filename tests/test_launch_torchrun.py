"""torchrun end to end: `torchrun --nproc-per-node 2 meshserve generate` finds its rank, world and
rendezvous in torchrun's variables and gives the tokens of a local run on the same tp=2 x pp=1
engine; a wrong process count is refused, naming torchrun, before any weights load."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import TINY, write_llama
from tests.conftest import ROOT, meshserve, read_jsonl, write_jsonl
from tests.launchers import error_messages, launch_env, meshserve_command, unavailable

REQUESTS = [{"prompt_token_ids": [5, 17, 33, 8], "max_tokens": 5, "temperature": 0},
            {"prompt_token_ids": [60, 2, 99], "max_tokens": 4, "temperature": 0}]


@pytest.fixture(scope="module")
def torchrun() -> str:
    script = Path(sys.executable).parent / "torchrun"
    found = str(script) if script.exists() else shutil.which("torchrun")
    if found is None:
        unavailable("torchrun is missing (it comes with torch)")
    return found


@pytest.fixture(scope="module")
def engine(torchrun, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    hf = write_llama(root / "hf", **TINY)
    meshserve("build", "--model", hf, "--tp", 2, "--pp", 1, "--dtype", "float32", "--out", root / "engine",
              "--max-seq-len", 64, "--max-batch-size", 2, "--max-num-tokens", 32, "--kv-block-size", 8, "--quiet")
    return root / "engine"


def run_torchrun(torchrun: str, nproc: int, *args) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (its rendezvous on a port the OS picks) of `meshserve *args`."""
    return subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(nproc), "--no-python",
                           meshserve_command(), *map(str, args)], cwd=ROOT, env=launch_env(), capture_output=True,
                          text=True, timeout=300)


def test_torchrun_generate_matches_a_local_run(torchrun, engine, tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", REQUESTS)
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "local.jsonl", "--quiet")
    run = run_torchrun(torchrun, 2, "generate", "--engine", engine, "--input", requests,
                       "--output", tmp_path / "torchrun.jsonl", "--quiet")
    assert run.returncode == 0, run.stdout + run.stderr
    local = read_jsonl(tmp_path / "local.jsonl")
    assert [len(row["token_ids"]) for row in local] == [5, 4]
    assert read_jsonl(tmp_path / "torchrun.jsonl") == local


def test_torchrun_wrong_process_count_names_torchrun(torchrun, engine, tmp_path):
    """3 processes for a 2-rank engine whose rank files are not safetensors at all: the count error
    comes first, so it is checked before any weights load."""
    weightless = tmp_path / "engine"
    shutil.copytree(engine, weightless)
    for rank_file in weightless.glob("rank*.safetensors"):
        rank_file.write_bytes(b"not a safetensors file")
    requests = write_jsonl(tmp_path / "in.jsonl", REQUESTS)
    run = run_torchrun(torchrun, 3, "generate", "--engine", weightless, "--input", requests,
                       "--output", tmp_path / "out.jsonl", "--quiet")
    assert run.returncode != 0
    errors = error_messages(run.stdout + run.stderr)
    message = ("3 process(es) were started by torchrun, but the engine is built for 2 ranks (tp x pp); start "
               "exactly 2: torchrun --nproc-per-node ... with 2 processes in all")
    # every rank prints it (torchrun may stop the others once the first has exited)
    assert errors and all(re.fullmatch(r"(rank [12]: )?" + re.escape(message), e)
                          for e in errors), run.stdout + run.stderr
    assert not (tmp_path / "out.jsonl").exists()
