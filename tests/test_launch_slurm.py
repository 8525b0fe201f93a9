"""Slurm end to end: `sbatch launch/slurm/serve.sbatch CONFIG` on a real one-node cluster started
for the session builds a tp=2 x pp=2 engine with its 4 tasks, serves it (the job log shows the URL),
answers over HTTP exactly as a local run of the same engine does, and `scancel` ends every rank.
`build.sbatch` builds the same engine, byte-equal."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve
from tests.launchers import (complete, differing_files, generate_requests, generated, launch_env, local_completion,
                             meshserve_command, require_tools, unavailable, wait_gone, write_config)
from tests.slurm_cluster import SlurmCluster

LIMITS = ["--dtype", "float32", "--max-seq-len", 256, "--max-batch-size", 8, "--max-num-tokens", 48,
          "--kv-block-size", 8]  # as in write_config


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    require_tools("sbatch", "srun", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
    if os.geteuid() != 0:
        unavailable("the test's own Slurm cluster runs slurmctld/slurmd as root; run as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as err:
        logs = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"could not start Slurm: {err}\n{logs}") from None
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_llama_with_demo_tokenizer(tmp_path_factory.mktemp("slurm-hf") / "hf")


@pytest.fixture(scope="module")
def local_engine(hf_dir, tmp_path_factory):
    """tp=2 x pp=2, built by one local `meshserve build`."""
    out = tmp_path_factory.mktemp("slurm-local") / "engine"
    meshserve("build", "--model", hf_dir, "--tp", 2, "--pp", 2, *LIMITS, "--out", out, "--quiet")
    return out


@pytest.fixture(scope="module")
def reference(local_engine, tmp_path_factory):
    """The completion of a local run (no launcher) on the locally built engine."""
    return local_completion(local_engine, tmp_path_factory.mktemp("slurm-reference"))


def sbatch(slurm: SlurmCluster, script: str, *args, log: Path, ntasks: int = 4) -> str:
    """Submit launch/slurm/SCRIPT, its #SBATCH knobs overridden to fit this one CPU node."""
    knobs = ["--nodes=1", f"--ntasks-per-node={ntasks}", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00"]
    out = slurm.run("sbatch", "--parsable", *knobs, f"--output={log}", f"--chdir={ROOT}",
                    str(ROOT / "launch" / "slurm" / script), *map(str, args), env=launch_env())
    return out.stdout.strip().split(";")[0]


def wait_for_job(slurm: SlurmCluster, job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while job in slurm.jobs():
        assert time.monotonic() < deadline, f"job {job} still queued or running"
        time.sleep(0.5)


def wait_for_url(slurm: SlurmCluster, job: str, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(r"meshserve: serving on (http://[A-Za-z0-9_.\-\[\]:]+)", text)
        if m:
            return m.group(1)
        if job not in slurm.jobs():
            raise AssertionError(f"job {job} ended before serving:\n{text}\n{slurm.logs()}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not print its URL:\n{log.read_text(errors='replace')}")


def test_sbatch_serve_builds_answers_and_scancel_ends_every_rank(slurm, hf_dir, local_engine, reference,
                                                                 tmp_path):
    engine = tmp_path / "engines" / "tp2pp2"
    config = write_config(tmp_path / "slurm-tp2pp2.yaml", source=hf_dir, engine_dir=engine, tp=2, pp=2)
    log = tmp_path / "serve-job.log"
    job = sbatch(slurm, "serve.sbatch", config, log=log)
    try:
        url = wait_for_url(slurm, job, log, timeout=300)
        assert urlparse(url).hostname == slurm.node  # bound to 0.0.0.0: the log names the node
        assert complete(url) == reference
        assert differing_files(local_engine, engine) == []  # built by the job's 4 tasks on first use
        assert sorted(p.name for p in engine.parent.iterdir()) == ["tp2pp2"]
        slurm.run("scancel", job)
        wait_for_job(slurm, job, timeout=60)
        assert wait_gone(str(config), timeout=30) == []
        assert slurm.jobs() == []
    finally:
        slurm.run("scancel", job, check=False)
        for p in wait_gone(str(config), timeout=0):
            p.kill()
    text = log.read_text(errors="replace")
    assert "building engine" in text and "Finished server process" in text, text
    # the rendezvous port derives from the job id (job ids start at a random FirstJobId)
    assert f"rendezvous {slurm.node}:{29500 + int(job) % 10000}" in text, text


def test_sbatch_build_matches_local_build(slurm, hf_dir, local_engine, tmp_path):
    shared = tmp_path / "slurm"
    log = tmp_path / "build-job.log"
    job = sbatch(slurm, "build.sbatch", "--model", hf_dir, "--tp", 2, "--pp", 2, *LIMITS, "--out", shared,
                 "--quiet", log=log, ntasks=3)
    wait_for_job(slurm, job, timeout=180)
    text = log.read_text(errors="replace")
    assert text.count("engine written to") == 1, text
    assert differing_files(local_engine, shared) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-job.log", "slurm"]


def test_srun_generate_matches_a_local_run(slurm, local_engine, reference, tmp_path):
    """`srun -n 4 meshserve generate` inside the cluster: rank 0 writes the same answer as a local run."""
    import subprocess
    proc = subprocess.run(["srun", "--nodes=1", "--ntasks=4", "--cpus-per-task=1", "--kill-on-bad-exit=1",
                           f"--chdir={ROOT}", meshserve_command(), "generate", "--engine", str(local_engine),
                           "--input", str(generate_requests(tmp_path)), "--output", str(tmp_path / "out.jsonl"),
                           "--quiet"], env={**launch_env(), **slurm.env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + slurm.logs()
    assert generated(tmp_path / "out.jsonl") == reference


def test_sbatch_wrong_task_count_always_logs_the_error(slurm, local_engine, tmp_path):
    """3 tasks for a tp=2 x pp=2 engine: with --kill-on-bad-exit the first task to exit stops the
    others, so every task prints the error itself; the job log has it every time (3 tries)."""
    message = ("3 process(es) were started by slurm, but the engine is built for 4 ranks (tp x pp); "
               "start exactly 4: srun --ntasks 4 ...")
    logs = [tmp_path / f"wrong-count-{i}.log" for i in range(3)]
    config = write_config(tmp_path / "wrong-count.yaml", engine_dir=local_engine, tp=2, pp=2)
    jobs = [sbatch(slurm, "serve.sbatch", config, log=log, ntasks=3) for log in logs]
    for job in jobs:
        wait_for_job(slurm, job, timeout=120)
    for log in logs:
        text = log.read_text(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("meshserve: error:")]
        assert errors and all(message in e for e in errors), text
        assert "serving on" not in text, text


def test_sigkill_of_srun_ends_every_rank(slurm, local_engine, tmp_path):
    """srun killed outright: Slurm ends the step's tasks itself (they do not go on serving)."""
    import signal
    import subprocess

    import psutil

    from tests.launchers import OutputLines, kill_tree, processes_with
    marker = tmp_path / "srun-kill"  # names this test's processes
    marker.mkdir()
    proc = subprocess.Popen(["srun", "--nodes=1", "--ntasks=4", "--cpus-per-task=1", "--kill-on-bad-exit=1",
                             f"--chdir={ROOT}", meshserve_command(), "serve", "--engine", str(local_engine),
                             "--model-name", str(marker), "--port", "0", "--step-timeout", "3"],
                            env={**launch_env(), **slurm.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = OutputLines(proc)
    try:
        url = out.wait_for(r"serving on (http://[A-Za-z0-9_.\-\[\]:]+)", 300).group(1)
        ranks = [p for p in processes_with(str(marker)) if p.name() != "srun"]
        assert len(ranks) == 4, ranks
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        _, left = psutil.wait_procs(ranks, timeout=40)
        gone_at = time.monotonic()
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        for p in processes_with(str(marker)):
            p.kill()
    assert left == [], f"ranks outlived srun: {left}"
    assert gone_at - killed_at < 35, gone_at - killed_at
    import socket
    from urllib.parse import urlparse
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", urlparse(url).port)) != 0
