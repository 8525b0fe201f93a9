"""`meshserve random-checkpoint` and `meshserve bench latency|throughput` on CPU ranks: the JSON each
run writes holds the schema's keys with figures that agree with the run's own settings."""
from __future__ import annotations

import json

from tests.conftest import meshserve

SCHEMA = ("mode", "commit", "command", "date", "device", "gpus", "tp", "pp", "dtype", "shape", "load_format", "batch",
          "input_len", "output_len", "num_prompts", "output_tokens_per_s")


def test_random_checkpoint_then_bench_both_modes(tmp_path):
    meshserve("random-checkpoint", "--shape", "debug-tiny", "--dtype", "float32", "--out", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 4, 256)
    engine = tmp_path / "engine"
    meshserve("build", "--model", tmp_path / "hf", "--tp", 2, "--pp", 2, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 64, "--quiet")

    meshserve("bench", "latency", "--engine", engine, "--batch", 3, "--input-len", 9, "--output-len", 5,
              "--out", tmp_path / "latency.json")
    lat = json.loads((tmp_path / "latency.json").read_text())
    assert all(k in lat for k in SCHEMA + ("ms_per_token", "copy_bandwidth_GBps", "control_plane_share")), sorted(lat)
    assert 0 < lat["control_plane_share"] <= 1 and lat["control_plane_ms_per_step"] > 0
    assert (lat["mode"], lat["tp"], lat["pp"], lat["batch"], lat["input_len"], lat["output_len"]) == \
        ("latency", 2, 2, 3, 9, 5)
    assert lat["shape"]["hidden"] == 64 and lat["device"] == "cpu" and "bench latency" in lat["command"]
    assert lat["load_format"] == "safetensors"
    assert lat["output_tokens_per_s"] > 0 and lat["ms_per_token"] > 0 and lat["copy_bandwidth_GBps"] > 0

    meshserve("bench", "throughput", "--engine", engine, "--num-prompts", 7, "--input-len", 9, "--output-len", 5,
              "--max-batch-size", 4, "--profile", "--out", tmp_path / "throughput.json")
    thr = json.loads((tmp_path / "throughput.json").read_text())
    assert all(k in thr for k in SCHEMA), sorted(thr)
    assert (thr["mode"], thr["num_prompts"], thr["max_batch_size"]) == ("throughput", 7, 4)
    assert 0 < thr["peak_kv_blocks"] <= thr["kv_blocks"]
    assert thr["total_tokens_per_s"] > thr["output_tokens_per_s"] > 0
    profile = (tmp_path / "throughput.profile.txt").read_text()
    assert thr["profile"].endswith("throughput.profile.txt") and profile.startswith("wall ")
    assert "aten::mm" in profile, profile[:2000]


def test_bench_refuses_bad_settings(tmp_path):
    proc = meshserve("bench", "latency", "--engine", tmp_path / "none", "--batch", 0, check=False)
    assert proc.returncode == 2 and "--batch=0 is not allowed" in proc.stderr, proc.stderr


def test_measured_prompts_are_not_the_warm_up_prompts():
    """Else the measured prefill would be served by the prefix cache the warm-up filled."""
    from types import SimpleNamespace

    from meshserve.orchestrator.bench import BenchSettings, _requests
    seen = {}

    class Loop:
        meta = SimpleNamespace(spec=SimpleNamespace(vocab_size=50000))

        def add_request(self, ids, params):
            seen.setdefault(self.round, []).append(tuple(ids))

    loop = Loop()
    for loop.round in (True, False):
        _requests(loop, BenchSettings("latency", batch=3, input_len=16), 3, 4, warm_up=loop.round)
    assert not set(seen[True]) & set(seen[False]) and len(set(seen[False])) == 3
    assert not {p[:16] for p in seen[True]} & {p[:16] for p in seen[False]}


def test_response_format_puts_a_grammar_on_every_request(tmp_path):
    """--response-format: named schemas, a schema's text or @FILE reach every request's sampling
    parameters and the JSON; anything else is refused naming the forms allowed."""
    from types import SimpleNamespace

    from meshserve.orchestrator.bench import BenchSettings, _requests
    from meshserve.orchestrator.cli import BENCH_SCHEMAS, _bench_grammar
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    assert _bench_grammar("string_field") == {"json_schema": BENCH_SCHEMAS["string_field"]}
    assert _bench_grammar(json.dumps(schema)) == _bench_grammar(f"@{tmp_path / 's.json'}") == {"json_schema": schema}
    params = []
    loop = SimpleNamespace(meta=SimpleNamespace(spec=SimpleNamespace(vocab_size=300)),
                           add_request=lambda ids, p: params.append(p))
    _requests(loop, BenchSettings("throughput", structured={"json_schema": schema}), 3, 4, warm_up=False)
    assert [p.structured for p in params] == [{"json_schema": schema}] * 3

    engine = tmp_path / "e"
    meshserve("build", "--shape", "debug-tiny", "--load-format", "dummy", "--out", engine, "--quiet")
    meshserve("bench", "latency", "--engine", engine, "--batch", 2, "--input-len", 4, "--output-len", 6,
              "--response-format", "string_field", "--out", tmp_path / "g.json")
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["response_format"] == {"json_schema": BENCH_SCHEMAS["string_field"]} and report["output_tokens_per_s"] > 0
    bad = meshserve("bench", "latency", "--engine", engine, "--response-format", "yaml", check=False)
    assert bad.returncode == 2 and "--response-format 'yaml' is neither json_object, string_field nor JSON" in bad.stderr
