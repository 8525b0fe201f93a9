"""Rank files written by `meshserve build` hold exactly the TensorRT-LLM Llama layout.

The expected tensors are derived here from the layout rules (not from meshserve.workers.engine_layout), so a
mistake in the project's slicing shows up as a mismatch against the Hugging Face source tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.checkpoints import TINY, TINY_TIED, write_llama
from tests.conftest import meshserve

ODD = dict(TINY, vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
           num_attention_heads=6, num_key_value_heads=2, head_dim=8)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        # GQA (8 heads, 2 kv heads), llama3 rope, untied lm_head, 5 layers; sharded to exercise the index.
        "tiny": write_llama(root / "tiny", seed=3, shards=2, **TINY),
        # MHA-ish (8 heads, 4 kv heads), explicit head_dim 12 != hidden/heads, tied embeddings, 4 layers.
        "tied": write_llama(root / "tied", seed=5, **TINY_TIED),
        # 6 heads, 2 kv heads, intermediate 100 and vocab 97 that tp=6 does not divide.
        "odd": write_llama(root / "odd", seed=7, **ODD),
    }


def read_hf(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((model_dir / "config.json").read_text())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for fname in files:
        with safe_open(str(model_dir / fname), framework="pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} appears in two shards"
                tensors[name] = f.get_tensor(name)
    return cfg, tensors


def layers_per_stage(num_layers: int, pp: int) -> list[list[int]]:
    """Contiguous layer ranges; the first num_layers % pp stages take one extra layer."""
    stages, next_layer = [], 0
    for stage in range(pp):
        count = num_layers // pp + (1 if stage < num_layers % pp else 0)
        stages.append(list(range(next_layer, next_layer + count)))
        next_layer += count
    assert next_layer == num_layers
    return stages


def expected_rank(cfg: dict, src: dict[str, torch.Tensor], tp: int, pp: int, rank: int) -> dict[str, torch.Tensor]:
    stage, t = rank // tp, rank % tp
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    out: dict[str, torch.Tensor] = {}

    if stage == 0:
        out["transformer.vocab_embedding.weight"] = src["model.embed_tokens.weight"]

    q_lo, q_hi = t * heads // tp, (t + 1) * heads // tp
    group = heads // kv_heads  # query heads that share one KV head
    # The KV heads this rank's query heads read: a slice of them, or one duplicated head.
    kv_lo, kv_hi = q_lo // group, (q_hi - 1) // group + 1
    assert tp > kv_heads or kv_hi - kv_lo == kv_heads // tp
    i_per = -(-inter // tp)  # intermediate padded with zero rows/columns up to a multiple of tp
    i_lo, i_hi = t * i_per, (t + 1) * i_per
    o_lo, o_hi = t * heads * d // tp, (t + 1) * heads * d // tp

    def padded(w: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(w.shape)
        shape[dim] = i_per * tp - inter
        return torch.cat([w, torch.zeros(shape, dtype=w.dtype)], dim=dim)

    for local, layer in enumerate(layers_per_stage(cfg["num_hidden_layers"], pp)[stage]):
        s, o = f"model.layers.{layer}.", f"transformer.layers.{local}."
        out[o + "input_layernorm.weight"] = src[s + "input_layernorm.weight"]
        out[o + "attention.qkv.weight"] = torch.cat([
            src[s + "self_attn.q_proj.weight"][q_lo * d:q_hi * d],
            src[s + "self_attn.k_proj.weight"][kv_lo * d:kv_hi * d],
            src[s + "self_attn.v_proj.weight"][kv_lo * d:kv_hi * d],
        ], dim=0)
        out[o + "attention.dense.weight"] = src[s + "self_attn.o_proj.weight"][:, o_lo:o_hi]
        out[o + "post_layernorm.weight"] = src[s + "post_attention_layernorm.weight"]
        out[o + "mlp.fc.weight"] = padded(src[s + "mlp.gate_proj.weight"], 0)[i_lo:i_hi]
        out[o + "mlp.gate.weight"] = padded(src[s + "mlp.up_proj.weight"], 0)[i_lo:i_hi]
        out[o + "mlp.proj.weight"] = padded(src[s + "mlp.down_proj.weight"], 1)[:, i_lo:i_hi]

    if stage == pp - 1:
        out["transformer.ln_f.weight"] = src["model.norm.weight"]
        head = src["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else src["lm_head.weight"]
        assert head.shape == (vocab, hidden)
        per_rank = -(-vocab // tp)
        padded = torch.cat([head, torch.zeros(per_rank * tp - vocab, hidden, dtype=head.dtype)], dim=0)
        out["lm_head.weight"] = padded[t * per_rank:(t + 1) * per_rank]
    return out


def check_config(engine: Path, cfg: dict, tp: int, pp: int, dtype: str) -> None:
    trt = json.loads((engine / "config.json").read_text())
    assert trt["mapping"]["world_size"] == tp * pp
    assert trt["mapping"]["tp_size"] == tp
    assert trt["mapping"]["pp_size"] == pp
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    expected = {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "intermediate_size": -(-cfg["intermediate_size"] // tp) * tp,  # padded: TRT-LLM uses it / tp
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope.get("rope_theta", cfg.get("rope_theta")),
        "norm_epsilon": cfg["rms_norm_eps"],
    }
    got = {k: trt.get(k) for k in expected}
    assert got == expected
    scaling = trt.get("rotary_scaling")
    if rope.get("rope_type", "default") == "default":
        assert scaling is None
    else:
        assert scaling["type"] == rope["rope_type"]
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert scaling[key] == rope[key], key
    info = json.loads((engine / "engine.json").read_text())
    assert (info["tp"], info["pp"], info["dtype"]) == (tp, pp, dtype)


CASES = [
    pytest.param("tiny", 2, 3, "float32", id="gqa-tp2-pp3-uneven-layers"),
    pytest.param("tiny", 4, 2, "float32", id="gqa-tp4-pp2-kv-duplicated"),
    pytest.param("tied", 4, 1, "float32", id="tied-headdim12-tp4-vocab-padded"),
    pytest.param("tied", 2, 2, "bfloat16", id="tied-tp2-pp2-bfloat16"),
    pytest.param("odd", 6, 1, "float32", id="odd-tp6-intermediate-padded-kv-duplicated"),
    pytest.param("odd", 6, 2, "bfloat16", id="odd-tp6-pp2-bfloat16-intermediate-padded"),
]


@pytest.mark.parametrize("model, tp, pp, dtype", CASES)
def test_rank_files_follow_trtllm_layout(checkpoints, tmp_path, model, tp, pp, dtype):
    hf_dir = checkpoints[model]
    cfg, src = read_hf(hf_dir)
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf_dir, "--tp", tp, "--pp", pp, "--dtype", dtype, "--out", engine, "--quiet")

    check_config(engine, cfg, tp, pp, dtype)
    world = tp * pp
    assert sorted(p.name for p in engine.glob("rank*.safetensors")) == \
        sorted(f"rank{r}.safetensors" for r in range(world))

    target = TORCH_DTYPES[dtype]
    problems = []
    for rank in range(world):
        want = {k: v.to(target) for k, v in expected_rank(cfg, src, tp, pp, rank).items()}
        with safe_open(str(engine / f"rank{rank}.safetensors"), framework="pt") as f:
            names = set(f.keys())
            if names != set(want):
                problems.append(f"rank{rank}: missing {sorted(set(want) - names)}, "
                                f"unexpected {sorted(names - set(want))}")
            for name in sorted(names & set(want)):
                raw_dtype = f.get_slice(name).get_dtype()
                got = f.get_tensor(name)
                if raw_dtype != SAFETENSORS_DTYPES[target] or got.dtype != target:
                    problems.append(f"rank{rank} {name}: dtype {raw_dtype}/{got.dtype}, expected {target}")
                elif tuple(got.shape) != tuple(want[name].shape):
                    problems.append(f"rank{rank} {name}: shape {tuple(got.shape)}, "
                                    f"expected {tuple(want[name].shape)}")
                elif not torch.equal(got, want[name]):
                    problems.append(f"rank{rank} {name}: values differ from the source slice")
    assert not problems, "\n".join(problems)


def test_layout_cases_cover_the_hard_spots(checkpoints):
    """Guard that the cases above still exercise what they are named for, should TINY* change."""
    tiny, _ = read_hf(checkpoints["tiny"])
    tied, tied_src = read_hf(checkpoints["tied"])
    assert tiny["num_hidden_layers"] % 3 != 0  # uneven pipeline split for pp=3
    assert 4 > tiny["num_key_value_heads"]  # kv heads duplicated at tp=4
    assert not tiny["tie_word_embeddings"] and tied["tie_word_embeddings"]
    assert "lm_head.weight" not in tied_src
    assert tied["head_dim"] != tied["hidden_size"] // tied["num_attention_heads"]
    assert tied["vocab_size"] % 4 and tied["vocab_size"] % 2  # lm_head needs zero padding
    assert (checkpoints["tiny"] / "model.safetensors.index.json").is_file()  # sharded source
    odd, _ = read_hf(checkpoints["odd"])
    assert odd["intermediate_size"] % 6  # MLP needs zero padding
    assert 6 > odd["num_key_value_heads"] and odd["vocab_size"] % 6


def test_older_engines_cut_short_are_refused(checkpoints, tmp_path):
    """Format-1 engines held intermediate_size // tp MLP columns per rank: wrong wherever tp does not
    divide it. Those must be refused with a rebuild hint; format-1 engines at a dividing tp still load."""
    from meshserve.errors import UserError
    from meshserve.workers.engine_files import read_engine_meta
    engine = tmp_path / "engine"
    meshserve("build", "--model", checkpoints["odd"], "--tp", 2, "--pp", 1, "--dtype", "float32", "--out", engine,
              "--quiet")

    def as_format_1(tp: int) -> None:
        info, cfg = json.loads((engine / "engine.json").read_text()), json.loads((engine / "config.json").read_text())
        info["format"], cfg["mapping"]["tp_size"], cfg["intermediate_size"] = "meshserve-engine/1", tp, 100
        (engine / "engine.json").write_text(json.dumps(info))
        (engine / "config.json").write_text(json.dumps(cfg))

    as_format_1(tp=2)  # 100 % 2 == 0: the same layout as today
    assert read_engine_meta(engine).spec.intermediate_size == 100
    as_format_1(tp=6)
    for r in range(2, 6):
        (engine / f"rank{r}.safetensors").write_bytes((engine / "rank0.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"tp=6, which does not divide intermediate_size=100.*rebuild"):
        read_engine_meta(engine)
