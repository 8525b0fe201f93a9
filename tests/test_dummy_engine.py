"""Engines of load format "dummy": config.json and engine.json only, random weights made at load with
the names, shapes and dtype a real build writes; generation and `meshserve bench` run on them."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from meshserve.errors import UserError
from meshserve.orchestrator.cli import parser
from meshserve.orchestrator.config import EngineConfig, ParallelConfig
from meshserve.orchestrator.llm import LLM
from meshserve.orchestrator.sampling_params import SamplingParams
from meshserve.workers.build.engine_build import build_dummy_engine, build_engine
from meshserve.workers.build.random_checkpoint import write_random_llama
from meshserve.workers.engine_files import load_rank_weights, read_engine_meta
from meshserve.workers.engine_layout import padded_vocab
from tests.conftest import meshserve

# intermediate 100 and vocab 101: tp 8 pads both; tp 4 and 8 duplicate the 2 KV heads
SIZES = dict(hidden=64, layers=3, heads=8, kv_heads=2, intermediate=100, vocab=101)
LAYOUTS = [(1, 1), (2, 3), (4, 2), (8, 1)]


def _cli_build(*argv) -> None:
    args = parser().parse_args(["build", *map(str, argv)])
    args.func(args)


def _signature(weights: dict) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in weights.items()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("dummy") / "hf"
    write_random_llama(path, dtype=torch.float32, **SIZES)
    return path


@pytest.fixture(scope="module")
def config_only(hf, tmp_path_factory):
    """The checkpoint's config.json alone: a dummy build reads nothing else."""
    d = tmp_path_factory.mktemp("config_only")
    shutil.copy(hf / "config.json", d / "config.json")
    return d


def test_dummy_weights_match_a_real_build_for_every_rank(hf, config_only, tmp_path):
    engine = EngineConfig(dtype="bfloat16", max_seq_len=64)
    for tp, pp in LAYOUTS:
        parallel = ParallelConfig(tp=tp, pp=pp)
        real, dummy = tmp_path / f"real-{tp}-{pp}", tmp_path / f"dummy-{tp}-{pp}"
        build_engine(str(hf), str(real), parallel, engine, jobs=1, show_progress=False)
        build_dummy_engine(str(config_only), None, str(dummy), parallel, engine)
        assert sorted(p.name for p in dummy.iterdir()) == ["config.json", "engine.json"]
        assert (dummy / "config.json").read_text() == (real / "config.json").read_text()
        real_meta, dummy_meta = read_engine_meta(real), read_engine_meta(dummy)
        assert (real_meta.load_format, dummy_meta.load_format) == ("safetensors", "dummy")
        for rank in range(tp * pp):
            made = load_rank_weights(dummy_meta, rank, "cpu")
            assert _signature(made) == _signature(load_rank_weights(real_meta, rank, "cpu")), (tp, pp, rank)
            assert all(torch.equal(t, load_rank_weights(dummy_meta, rank, "cpu")[n]) for n, t in made.items())
            assert all(t.abs().max() < 1 if t.dim() == 2 else bool((t == 1).all()) for t in made.values())
            pad = padded_vocab(real_meta.spec, tp) - SIZES["vocab"]
            if "lm_head.weight" in made and rank % tp == tp - 1 and pad:
                assert not made["lm_head.weight"][-pad:].any()  # vocab padding: zero rows, as built
    # the embedding (whole on every TP rank) is the same on each; a layer is the same at any pp
    two_by_three = read_engine_meta(tmp_path / "dummy-2-3")
    first, second = (load_rank_weights(two_by_three, r, "cpu") for r in (0, 1))
    emb = "transformer.vocab_embedding.weight"
    assert torch.equal(first[emb], second[emb])
    assert not torch.equal(first["transformer.layers.0.attention.qkv.weight"],
                           second["transformer.layers.0.attention.qkv.weight"])
    build_dummy_engine(str(config_only), None, str(tmp_path / "dummy-2-1"), ParallelConfig(tp=2), engine)
    one_stage = load_rank_weights(read_engine_meta(tmp_path / "dummy-2-1"), 1, "cpu")
    third_stage = load_rank_weights(two_by_three, 5, "cpu")
    assert torch.equal(one_stage["transformer.layers.2.mlp.proj.weight"],
                       third_stage["transformer.layers.0.mlp.proj.weight"])


def test_dummy_build_from_a_shape_and_its_errors(tmp_path, capsys):
    out = tmp_path / "l70b"
    _cli_build("--shape", "llama-3-70b", "--load-format", "dummy", "--tp", 8, "--pp", 2, "--out", out)
    assert "largest rank 9.93 GiB" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "engine.json", "tokenizer.json",
                                                     "tokenizer_config.json"]  # the synthetic tokenizer
    eng = json.loads((out / "engine.json").read_text())
    assert (eng["load_format"], eng["has_tokenizer"], eng["source"]) == ("dummy", True, "shape llama-3-70b")
    meta = read_engine_meta(out)
    assert (meta.load_format, meta.tp, meta.pp, meta.dtype) == ("dummy", 8, 2, "bfloat16")
    assert (meta.spec.hidden_size, meta.spec.num_layers, meta.spec.vocab_size) == (8192, 80, 128256)

    bad = [(["--shape", "llama-9-1t", "--load-format", "dummy"],
            "unknown shape 'llama-9-1t'; known shapes: debug-tiny, llama-3-70b, llama-3-8b, tinyllama-1b"),
           (["--shape", "debug-tiny"], "--shape needs --load-format dummy"),
           (["--load-format", "dummy"], "no model given: pass --model DIR|FILE.gguf|demo"),
           (["--shape", "debug-tiny", "--model", tmp_path, "--load-format", "dummy"], "give exactly one"),
           (["--shape", "debug-tiny", "--load-format", "dummy", "--tp", 3],
            "parallel.tp=3 does not divide num_attention_heads=4"),
           (["--model", tmp_path, "--load-format", "dummy"], "no config.json")]
    for argv, message in bad:
        with pytest.raises(UserError, match=message.replace("|", r"\|")):
            _cli_build(*argv, "--out", tmp_path / "never")
    assert not (tmp_path / "never").exists() and [p.name for p in tmp_path.iterdir()] == ["l70b"]
    with pytest.raises(UserError, match="already exists"):
        _cli_build("--shape", "debug-tiny", "--load-format", "dummy", "--out", out)
    eng["load_format"] = "pickle"
    (out / "engine.json").write_text(json.dumps(eng))
    with pytest.raises(UserError, match="load_format 'pickle' is not one of safetensors, dummy"):
        read_engine_meta(out)


def test_generate_on_dummy_engines_is_reproducible_and_in_vocab(config_only, tmp_path):
    """tp=1 in this process, twice: the same tokens; pp=2 holds the same weights, so the same tokens too;
    tp=2 holds other random shards, so it only has to run. Sampled tokens never reach the padded vocab."""
    engine = EngineConfig(dtype="float32", max_seq_len=64, max_batch_size=4, max_num_tokens=64)
    for tp, pp in ((1, 1), (1, 2), (2, 1)):
        build_dummy_engine(str(config_only), None, str(tmp_path / f"e{tp}{pp}"), ParallelConfig(tp, pp), engine)
    prompts = [[1, 17, 42, 5], [7, 100, 2, 0, 33]]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)]

    def run(name):  # one request at a time: every layout runs the same batches
        with LLM(tmp_path / name) as llm:
            return [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]

    first = run("e11")
    assert first == run("e11") == run("e12")
    tp2 = run("e21")
    for tokens in (first, tp2):
        assert [len(t) for t in tokens] == [8, 40] and all(0 <= i < SIZES["vocab"] for t in tokens for i in t)
    assert len(set(first[1])) > 10  # sampling spreads over the vocabulary


def test_bench_on_a_dummy_engine(tmp_path):
    engine = tmp_path / "engine"
    meshserve("build", "--shape", "debug-tiny", "--load-format", "dummy", "--tp", 2, "--dtype", "float32",
              "--max-seq-len", 64, "--out", engine)
    meshserve("bench", "throughput", "--engine", engine, "--num-prompts", 3, "--input-len", 6, "--output-len", 4,
              "--out", tmp_path / "thr.json")
    thr = json.loads((tmp_path / "thr.json").read_text())
    assert (thr["load_format"], thr["tp"], thr["engine"], thr["num_prompts"]) == ("dummy", 2, "engine", 3)
    assert thr["shape"] == {"hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16,
                            "intermediate": 96, "vocab": 256}
    assert thr["output_tokens_per_s"] > 0


def test_named_shape_engine_serves_with_its_synthetic_tokenizer(tmp_path):
    """A dummy engine of a named shape carries a byte-level tokenizer: it serves over HTTP (the
    official client) token-id and text prompts, and grammars compile against it."""
    import json as json_

    import openai

    from tests.serving import Server
    meshserve("build", "--shape", "debug-tiny", "--load-format", "dummy", "--out", tmp_path / "e", "--quiet")
    server = Server("--engine", tmp_path / "e", "--model-name", "m")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        by_ids = client.completions.create(model="m", prompt=[5, 9, 11], max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert by_ids.usage.completion_tokens == 5 and by_ids.choices[0].finish_reason == "length"
        by_text = client.completions.create(model="m", prompt="héllo", max_tokens=2, temperature=0)
        assert by_text.usage.prompt_tokens == len("héllo".encode())  # one token per byte
        answer = client.completions.create(model="m", prompt="x", max_tokens=60, temperature=0,
                                           extra_body={"guided_json": {"type": "object"}})
        text = answer.choices[0].text
        assert text.startswith("{"), text
        if answer.choices[0].finish_reason == "stop":
            assert isinstance(json_.loads(text), dict)
    finally:
        assert server.stop() == 0, server.output


def test_synthetic_tokenizer_round_trips_any_text(tmp_path):
    """Any text (any Unicode, control characters, the special tokens' own spelling) encodes one token
    per UTF-8 byte and decodes back to itself; bos and eos stay special."""
    import random

    from transformers import AutoTokenizer

    from meshserve.workers.build.synthetic_tokenizer import write_synthetic_tokenizer
    write_synthetic_tokenizer(tmp_path, 1000, 1, 2)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id) == (1000, 1, 2)
    rng = random.Random(5)
    alphabet = [chr(c) for c in (*range(0, 0x250), 0x3042, 0x1F600, 0xFFFD)]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.encode()) and all(i < 258 and i not in (1, 2) for i in ids), text
        assert tok.decode(ids) == text
    assert tok.decode([1, 500, 2], skip_special_tokens=True) == "<t500>"
