"""The README's "Try it": `meshserve generate configs/demo.yaml --chat ...` and `meshserve serve
configs/demo.yaml` answer "What is the capital of France?" with Paris (greedy), token for token as
transformers does with SmolLM2-135M-Instruct from the same GGUF file, and the demo engine is built
once into $MESHSERVE_CACHE, then reused.

One engine (tp=3 x pp=2 on CPU) serves every test here: the first `generate` builds it into a new,
empty cache folder that holds only the demo model file.
"""
from __future__ import annotations

import os
import shutil

import openai
import pytest
import torch

from tests.conftest import ROOT, meshserve
from tests.serving import Server

CONFIG = ROOT / "configs" / "demo.yaml"
QUESTION = "What is the capital of France?"
BUILDING = "building engine "

pytestmark = pytest.mark.slow


def generate_chat(cache):
    """`meshserve generate configs/demo.yaml --chat QUESTION` with MESHSERVE_CACHE=cache."""
    return meshserve("generate", CONFIG, "--chat", QUESTION, "--max-tokens", 24,
                     env={"MESHSERVE_CACHE": str(cache)})


@pytest.fixture(scope="module")
def reference():
    """transformers' greedy answer from the demo's GGUF file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meshserve.orchestrator.demo_model import demo_gguf_path
    gguf = demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def rank_files(cache) -> dict[str, int]:
    """{path: mtime_ns} of every rank file under cache/engines."""
    return {str(p): p.stat().st_mtime_ns for p in sorted((cache / "engines").glob("*/rank*.safetensors"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A cache holding only the demo model, and the output of the first generate, which builds."""
    from meshserve.orchestrator.demo_model import DEMO_FILE, demo_gguf_path
    gguf = demo_gguf_path()  # fetched into the test environment's own cache once
    cache = tmp_path_factory.mktemp("cache")
    (cache / "demo").mkdir()
    os.symlink(gguf.resolve(), cache / "demo" / DEMO_FILE)
    try:
        proc = generate_chat(cache)
        yield cache, proc, rank_files(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # about 0.9 GB of rank files


def test_generate_chat_answers_paris_and_builds_into_the_cache(first_run):
    cache, proc, built = first_run
    building = [line for line in proc.stdout.splitlines() if line.startswith(BUILDING)]
    assert len(building) == 1, proc.stdout
    (engine,) = {os.path.dirname(p) for p in built}
    assert building[0].startswith(f"{BUILDING}{engine} "), (building, engine)
    assert os.path.dirname(engine) == str(cache / "engines")
    assert sorted(os.path.basename(p) for p in built) == [f"rank{r}.safetensors" for r in range(6)]
    assert f"> {QUESTION}\n" in proc.stdout and "Paris" in proc.stdout.split(QUESTION, 1)[1], proc.stdout


def test_generate_chat_equals_transformers(first_run, reference):
    _, proc, _ = first_run
    assert reference.strip() and reference.strip() in proc.stdout.split(QUESTION, 1)[1], (reference, proc.stdout)


def test_second_run_reuses_the_cached_engine(first_run):
    cache, _, built = first_run
    proc = generate_chat(cache)
    assert BUILDING not in proc.stdout, proc.stdout
    assert rank_files(cache) == built  # same files, untouched
    assert "Paris" in proc.stdout.split(QUESTION, 1)[1], proc.stdout


def test_serve_demo_answers_a_chat_through_the_openai_client(first_run, reference):
    cache, _, built = first_run
    server = Server(CONFIG, env={"MESHSERVE_CACHE": str(cache)})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        out = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                             messages=[{"role": "user", "content": QUESTION}])
        answer = out.choices[0].message.content
        assert "Paris" in answer and out.choices[0].finish_reason == "stop", answer
        assert answer == reference, (answer, reference)
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert BUILDING not in server.output and rank_files(cache) == built
