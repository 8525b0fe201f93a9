"""Wrong inputs exit non-zero with one clear line and leave no half-written engine behind."""
from __future__ import annotations

import json

import pytest

from tests.checkpoints import TINY, write_llama
from tests.conftest import meshserve, write_jsonl


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("hf") / "model", **TINY)


@pytest.fixture(scope="module")
def engine(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "tp2"
    meshserve("build", "--model", hf_dir, "--tp", 2, "--dtype", "float32", "--out", out, "--max-seq-len", 64,
              "--quiet")
    return out


def fails_with(*args, expect: str):
    proc = meshserve(*args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and lines[0].startswith("meshserve: error:"), proc.stderr
    assert expect in lines[0], lines[0]
    return lines[0]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_missing_model(tmp_path):
    fails_with("build", "--model", tmp_path / "nope", "--out", tmp_path / "e", expect="does not exist")
    assert leftovers(tmp_path) == []


def test_missing_weights(tmp_path, hf_dir):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((hf_dir / "config.json").read_text())
    fails_with("build", "--model", tmp_path / "m", "--out", tmp_path / "e", expect="no *.safetensors")
    assert leftovers(tmp_path) == ["m"]


def test_non_llama_config(tmp_path, hf_dir):
    (tmp_path / "m").mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text()) | {"model_type": "gpt2",
                                                              "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    fails_with("build", "--model", tmp_path / "m", "--out", tmp_path / "e", expect="model_type='gpt2'")


def test_tp_not_dividing_heads(tmp_path, hf_dir):
    fails_with("build", "--model", hf_dir, "--tp", 3, "--out", tmp_path / "e",
               expect="tp=3 does not divide num_attention_heads=8")
    assert leftovers(tmp_path) == []


def test_truncated_weights_leave_nothing_behind(tmp_path, hf_dir):
    model = tmp_path / "m"
    model.mkdir()
    for f in hf_dir.iterdir():
        data = f.read_bytes()
        (model / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    proc = meshserve("build", "--model", model, "--tp", 2, "--pp", 2, "--out", tmp_path / "e", check=False)
    assert proc.returncode != 0
    assert "truncated" in proc.stderr
    assert leftovers(tmp_path) == ["m"]


def test_existing_output_is_kept(tmp_path, hf_dir):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    fails_with("build", "--model", hf_dir, "--out", tmp_path / "e", expect="--overwrite")
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("text,expect", [
    ("model: [unclosed\n", "not valid YAML at line"),
    ("model:\n  source: x\nparallel:\n  tp: 0\n", "parallel.tp=0 is not allowed"),
    ("model:\n  source: x\nengine:\n  dtype: int4\n", "engine.dtype='int4' is not allowed"),
    ("model:\n  source: x\nparallel:\n  tensor: 2\n", "unknown key(s) parallel.tensor"),
    ("parallel:\n  tp: 2\n", "missing section 'model'"),
])
def test_bad_yaml(tmp_path, text, expect):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    fails_with("build", cfg, expect=expect)


def test_generate_missing_engine(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt_token_ids": [1, 2]}])
    fails_with("generate", "--engine", tmp_path / "none", "--input", inp, expect="does not exist")


@pytest.mark.parametrize("row,expect", [
    ({"prompt_token_ids": [1, 2], "temperature": -1}, "temperature=-1 is not allowed"),
    ({"prompt_token_ids": [1, 2], "top_p": 0}, "top_p=0 is not allowed"),
    ({"prompt_token_ids": [1, 2], "colour": "red"}, "unknown field(s) colour"),
    ({"prompt_token_ids": [1, 1000]}, "outside the vocabulary"),
    ({"prompt_token_ids": [1] * 60, "max_tokens": 10}, "exceeds the engine's max_seq_len 64"),
    ({"prompt": "hello"}, "has no tokenizer"),
    ({}, "give exactly one of prompt"),
])
def test_generate_bad_request(tmp_path, engine, row, expect):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt_token_ids": [3]}, row])
    fails_with("generate", "--engine", engine, "--input", inp, "--output", tmp_path / "o.jsonl", expect=expect)
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_bad_json_line(tmp_path, engine):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_token_ids": [1]}\n{oops\n')
    fails_with("generate", "--engine", engine, "--input", inp, expect="in.jsonl:2: not valid JSON")
