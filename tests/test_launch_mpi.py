"""mpirun end to end: a parallel build, a tp=2 x pp=2 server whose answer equals a local run's token
for token, clean stops, and a wrong process count refused before any weights load (CPU ranks, gloo)."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess

import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve
from tests.launchers import (complete, differing_files, error_messages, generate_requests, generated, launch_env,
                             local_completion, meshserve_command, require_tools, wait_gone, write_config)
from tests.serving import Server

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
LIMITS = ["--dtype", "float32", "--max-seq-len", 256, "--max-batch-size", 8, "--max-num-tokens", 48,
          "--kv-block-size", 8]


@pytest.fixture(scope="module", autouse=True)
def _needs_mpirun():  # module scope: checked before the module's engine is built
    require_tools("mpirun", modules=("mpi4py",))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_llama_with_demo_tokenizer(tmp_path_factory.mktemp("mpi-hf") / "hf")


@pytest.fixture(scope="module")
def engine(hf_dir, tmp_path_factory):
    """tp=2 x pp=2, built by one local `meshserve build`."""
    out = tmp_path_factory.mktemp("mpi-engine") / "local"
    meshserve("build", "--model", hf_dir, "--tp", 2, "--pp", 2, *LIMITS, "--out", out, "--quiet")
    return out


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """The completion of a local run (no launcher) on the same engine."""
    return local_completion(engine, tmp_path_factory.mktemp("mpi-reference"))


def mpirun(*args, np: int, timeout: float, launcher_args=()) -> subprocess.CompletedProcess:
    return subprocess.run([*MPIRUN, *map(str, launcher_args), "-np", str(np), meshserve_command(), *map(str, args)],
                          cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)


def open_mpi_major() -> int:
    m = re.search(r"Open MPI\)? (\d+)\.", subprocess.run(["mpirun", "--version"], capture_output=True,
                                                           text=True).stdout)
    return int(m.group(1)) if m else 0


def test_mpirun_build_matches_local_build(hf_dir, engine, tmp_path):
    """`mpirun -np 2 --hostfile HOSTS meshserve build`: each process writes 2 of the 4 rank files."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    out = tmp_path / "mpi"
    proc = mpirun("build", "--model", hf_dir, "--tp", 2, "--pp", 2, *LIMITS, "--out", out, np=2, timeout=300,
                  launcher_args=("--hostfile", hosts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("engine written to") == 1, proc.stdout  # only rank 0 reports
    assert differing_files(engine, out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts", "mpi"]  # no partial folder left behind


def test_mpirun_generate_matches_a_local_run(engine, reference, tmp_path):
    proc = mpirun("generate", "--engine", engine, "--input", generate_requests(tmp_path), "--output",
                  tmp_path / "out.jsonl", "--quiet", np=4, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert generated(tmp_path / "out.jsonl") == reference


def test_mpirun_serve_then_sigterm_to_mpirun(engine, reference, tmp_path):
    """`mpirun -np 4 meshserve serve CONFIG` answers as a local run does; SIGTERM to mpirun ends every rank."""
    config = write_config(tmp_path / "tp2pp2.yaml", engine_dir=engine, tp=2, pp=2)
    server = Server(command=[*MPIRUN, "-np", 4, meshserve_command(), "serve", config], env=launch_env())
    try:
        assert len(server.descendants()) == 4
        assert complete(server.url) == reference
        code = server.stop(timeout=60)  # also checks that no rank outlives mpirun
    finally:
        if server.proc.poll() is None:
            server.kill()
    # Open MPI 4.x's mpirun always exits 1 once it was stopped by SIGTERM/SIGINT, even when every rank
    # exited 0; a run that ends by itself (or stopped through rank 0, below) exits 0.
    assert code == (1 if open_mpi_major() == 4 else 0), "".join(server.log)
    assert wait_gone(str(config), 10) == []


def test_mpirun_serve_stopped_through_rank0_exits_0(engine, reference):
    """SIGTERM to rank 0: it stops the server, tells the other ranks, and every process exits 0."""
    server = Server(command=[*MPIRUN, "-np", 4, meshserve_command(), "serve", "--engine", engine,
                             "--model-name", "m", "--port", 0], env=launch_env())
    try:
        assert complete(server.url) == reference
        ranks = server.descendants()
        rank0 = [p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == "0"]
        assert len(ranks) == 4 and len(rank0) == 1
        rank0[0].send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
        gone, alive = psutil.wait_procs(ranks, timeout=10)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code == 0, "".join(server.log)
    assert not alive
    assert "Finished server process" in "".join(server.log)


def test_mpirun_wrong_process_count_fails_fast(engine, tmp_path):
    """3 processes for a 4-rank engine: refused in one line before any weights load (the rank files
    here are not safetensors at all, so a load would fail with another error)."""
    weightless = tmp_path / "engine"
    shutil.copytree(engine, weightless)
    for rank_file in weightless.glob("rank*.safetensors"):
        rank_file.write_bytes(b"not a safetensors file")
    proc = mpirun("serve", "--engine", weightless, "--port", 0, np=3, timeout=120)
    assert proc.returncode != 0
    # every rank prints it (mpirun may stop the others once the first has exited)
    errors = error_messages(proc.stderr)
    message = ("3 process(es) were started by mpi, but the engine is built for 4 ranks (tp x pp); start exactly 4: "
               "mpirun -np 4 ...")
    assert errors, proc.stderr
    assert all(re.fullmatch(r"(rank [012]: )?" + re.escape(message), e) for e in errors), errors
    assert "serving on" not in proc.stdout
