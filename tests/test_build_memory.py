"""Building a 1B-parameter checkpoint into tp=2 x pp=2, two rank files at a time, stays within the
largest rank file plus 1 GiB.

The peak is what `meshserve build` itself measures and prints: the sampled sum of the resident memory of
the build process and all its worker processes. The number of workers is given (`--jobs`), not left to
the machine's CPU count, so the bound means the same on every machine.
"""
from __future__ import annotations

import re
import shutil
import time

import pytest
import torch

from meshserve.workers.build.random_checkpoint import write_random_llama
from tests.conftest import meshserve
from meshserve.workers.build.safetensors_io import SafetensorsFile

GIB = 1 << 30
TP, PP = 2, 2
JOBS = 2
SHAPE = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)
REPORT = re.compile(r"peak memory ([0-9.]+) GiB, largest rank file ([0-9.]+) GiB")


def _expected_rank_bytes(tensor_bytes: dict, layers: int) -> list[int]:
    """Tensor bytes of each rank file (bfloat16 in and out), derived from the source tensors."""
    per_layer = []
    for i in range(layers):
        p = f"model.layers.{i}."
        split = sum(tensor_bytes[p + n] for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                  "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                  "mlp.down_proj.weight")) // TP
        norms = tensor_bytes[p + "input_layernorm.weight"] + tensor_bytes[p + "post_attention_layernorm.weight"]
        per_layer.append(split + norms)
    half = layers // PP
    first = tensor_bytes["model.embed_tokens.weight"] + sum(per_layer[:half])  # whole embedding per TP rank
    last = sum(per_layer[half:]) + tensor_bytes["model.norm.weight"] + tensor_bytes["lm_head.weight"] // TP
    return [first] * TP + [last] * TP


@pytest.fixture
def big_dir(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps recent tmp dirs, and these hold about 4.5 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_1b_build_peak_memory_within_largest_rank_file_plus_1gib(big_dir):
    tmp_path = big_dir
    t0 = time.time()
    source = write_random_llama(tmp_path / "llama-1b", dtype=torch.bfloat16, **SHAPE)
    written = time.time() - t0
    h, kv, inter = SHAPE["hidden"], SHAPE["kv_heads"] * SHAPE["hidden"] // SHAPE["heads"], SHAPE["intermediate"]
    per_layer = 2 * h * h + 2 * kv * h + 3 * inter * h + 2 * h  # q, o; k, v; gate, up, down; two norms
    assert source["parameters"] == 2 * SHAPE["vocab"] * h + SHAPE["layers"] * per_layer + h, source["parameters"]
    assert source["parameters"] >= 1e9

    engine = tmp_path / "engine"
    proc = meshserve("build", "--model", tmp_path / "llama-1b", "--tp", TP, "--pp", PP, "--dtype", "bfloat16",
                     "--out", engine, "--jobs", JOBS, "--quiet")
    found = REPORT.search(proc.stdout)
    assert found, f"no memory report in the build output:\n{proc.stdout}\n{proc.stderr}"
    peak, largest = float(found.group(1)), float(found.group(2))
    measured = (f"{source['parameters'] / 1e9:.2f}B-parameter bfloat16 checkpoint "
                f"({source['bytes'] / GIB:.2f} GiB) into tp={TP} x pp={PP}, {JOBS} jobs: "
                f"peak memory {peak:.2f} GiB, "
                f"largest rank file {largest:.2f} GiB, limit {largest + 1:.2f} GiB "
                f"(checkpoint written in {written:.1f}s, build+check {time.time() - t0 - written:.1f}s)")
    print("\n" + measured)

    # the rank files: all there, the printed largest size is right, and they add up to the source
    # except for the layout's one duplication (the embedding, whole on every rank of stage 0)
    files = [engine / f"rank{r}.safetensors" for r in range(TP * PP)]
    sizes = [f.stat().st_size for f in files]
    assert abs(max(sizes) / GIB - largest) < 0.01, (sizes, measured)
    expected = _expected_rank_bytes(source["tensor_bytes"], SHAPE["layers"])
    for f, size, want in zip(files, sizes, expected):
        assert 0 <= size - want < 1 << 20, f"{f.name}: {size} bytes, expected {want} plus a header"
    embed = source["tensor_bytes"]["model.embed_tokens.weight"]
    assert abs(sum(sizes) - (source["bytes"] + (TP - 1) * embed)) < 4 << 20, (sizes, source["bytes"])
    for r, f in enumerate(files):
        names = set(SafetensorsFile(str(f)).names())
        on_first, on_last = r // TP == 0, r // TP == PP - 1
        assert ("transformer.vocab_embedding.weight" in names) == on_first, (f.name, on_first)
        assert ("lm_head.weight" in names) == on_last, (f.name, on_last)

    assert peak < largest + 1, measured
