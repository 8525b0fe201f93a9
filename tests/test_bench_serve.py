"""`meshserve bench serve` against a real server: Poisson and saturating arrivals, the JSON schema,
latency figures that hang together, and failures counted rather than hidden."""
from __future__ import annotations

import json

import pytest

from meshserve.orchestrator.bench_serve import percentile
from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve
from tests.serving import Server

KEYS = ("mode", "commit", "command", "date", "rate", "num_prompts", "input_len", "output_len", "completed",
        "failed", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "e2e_ms_p50", "e2e_ms_p99",
        "output_tokens_per_s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_serve")
    write_llama_with_demo_tokenizer(tmp / "hf")
    meshserve("build", "--model", tmp / "hf", "--dtype", "float32", "--out", tmp / "engine", "--max-seq-len", 64,
              "--quiet")
    srv = Server("--engine", tmp / "engine", "--max-batch-size", 4)
    yield srv, tmp
    srv.stop()


@pytest.mark.parametrize("rate", ["15", "inf"])
def test_bench_serve_reports_latency_percentiles(server, rate):
    srv, tmp = server
    out = tmp / f"serve-{rate}.json"
    processes = 3 if rate == "inf" else 1  # requests split over client processes add up all the same
    meshserve("bench", "serve", "--url", srv.url, "--rate", rate, "--num-prompts", 10, "--input-len", 6,
              "--output-len", 5, "--engine", tmp / "engine", "--out", out, "--client-processes", processes)
    r = json.loads(out.read_text())
    assert r["client_processes"] == processes and 0 <= r["send_lag_ms_p50"] <= r["send_lag_ms_p99"]
    assert all(k in r for k in KEYS), sorted(set(KEYS) - set(r))
    assert (r["mode"], r["completed"], r["failed"], r["rate"]) == ("serve", 10, 0, 15.0 if rate == "15" else "inf")
    assert r["tp"] == 1 and r["shape"]["vocab"] > 1000
    assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] <= r["e2e_ms_p99"]
    assert 0 < r["tpot_ms_p50"] <= r["tpot_ms_p99"] and r["e2e_ms_p50"] <= r["e2e_ms_p99"]
    assert r["output_tokens_per_s"] > 0 and abs(r["output_tokens_per_s"] * r["duration_s"] - 50) < 1e-6


def test_bench_serve_counts_failures(server):
    srv, tmp = server
    proc = meshserve("bench", "serve", "--url", srv.url, "--rate", "inf", "--num-prompts", 3, "--model", "nope",
                     "--out", tmp / "fail.json", check=False)
    r = json.loads((tmp / "fail.json").read_text())
    assert (r["completed"], r["failed"]) == (0, 3) and "404" in r["first_error"]
    assert proc.returncode != 0 and "every request failed" in proc.stderr
    bad = meshserve("bench", "serve", "--rate", "5", check=False)
    assert bad.returncode != 0 and "--url" in bad.stderr
    bad = meshserve("bench", "serve", "--url", srv.url, "--rate", "5", "--client-processes", -1, check=False)
    assert bad.returncode != 0 and "--client-processes=-1" in bad.stderr


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99), percentile(values, 100)) == \
        (50, 90, 99, 100)
