"""Random small Llama shapes and layouts for the shape-fuzzing exactness tests.

A case is drawn from a seeded generator, so a failure names a case that can be replayed. The rules for
which layouts must build are written here from the shape alone, independently of meshserve's code.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace

import torch

HEAD_DIMS = (8, 12, 16, 24, 32, 48)
ROPES = ("none", "linear", "llama3")


@dataclass(frozen=True)
class ShapeCase:
    seed: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    tied: bool
    rope: str
    tp: int
    pp: int
    kv_block_size: int
    prompt: tuple[int, ...]
    stored_head: bool = False  # tied, yet the checkpoint also holds an lm_head.weight of its own

    @property
    def must_build(self) -> bool:
        """tp splits the query heads evenly, and tp and the KV heads divide one another (KV heads
        split, or duplicated on tp / kv_heads ranks). Every other size is padded, never refused."""
        return self.heads % self.tp == 0 and (self.kv_heads % self.tp == 0 or self.tp % self.kv_heads == 0)

    @property
    def name(self) -> str:
        return (f"s{self.seed}-h{self.heads}kv{self.kv_heads}d{self.head_dim}-hid{self.hidden}"
                f"-i{self.intermediate}-v{self.vocab}-l{self.layers}-{'tied' if self.tied else 'untied'}"
                f"{'+head' if self.stored_head else ''}-{self.rope}-b{self.kv_block_size}-p{len(self.prompt)}"
                f"-tp{self.tp}pp{self.pp}")

    def hf_config(self) -> dict:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if self.rope == "linear":
            rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5}
        elif self.rope == "llama3":
            rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim, max_position_embeddings=128,
                    rms_norm_eps=1e-5, tie_word_embeddings=self.tied, rope_parameters=rope,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)


def draw_case(seed: int, max_world: int) -> ShapeCase:
    """One random shape and layout (tp in 1..8, pp in 1..layers); layouts of more than max_world ranks
    are drawn again."""
    rng = random.Random(seed)
    heads = rng.randint(1, 12)
    layers = rng.randint(1, 6)
    kv_heads = rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
    splittable = [t for t in range(1, 9) if heads % t == 0 and (kv_heads % t == 0 or t % kv_heads == 0)]
    while True:  # half the draws from the tp values that split this model, so most cases build
        tp = rng.choice(splittable) if rng.random() < 0.6 else rng.randint(1, 8)
        pp = rng.randint(1, layers)
        if tp * pp <= max_world:
            break
    case = ShapeCase(seed=seed, heads=heads, kv_heads=kv_heads,
                     head_dim=rng.choice(HEAD_DIMS), hidden=heads * rng.randint(2, 12), intermediate=rng.randint(16, 400),
                     vocab=rng.randint(50, 1000), layers=layers, tied=rng.random() < 0.5, rope=rng.choice(ROPES),
                     tp=tp, pp=pp, kv_block_size=rng.choice((1, 3, 8, 16)),
                     prompt=tuple(rng.randrange(50) for _ in range(rng.randint(1, 40))))
    return replace(case, stored_head=case.tied and rng.random() < 0.5)  # drawn last: earlier draws stay


def fuzz_cases() -> list[ShapeCase]:
    """The cases of this run: MESHSERVE_SHAPE_SEED (default 0) picks them, MESHSERVE_SHAPE_CASES how many
    (default 5), MESHSERVE_SHAPE_MAX_WORLD the largest tp x pp drawn (default 8)."""
    base = int(os.environ.get("MESHSERVE_SHAPE_SEED", "0"))
    count = int(os.environ.get("MESHSERVE_SHAPE_CASES", "5"))
    max_world = int(os.environ.get("MESHSERVE_SHAPE_MAX_WORLD", "8"))
    return [draw_case(base * 100_003 + i, max_world) for i in range(count)]


def store_distinct_head(model_dir, seed: int) -> None:
    """Add an lm_head.weight unlike the embedding to a tied checkpoint's model.safetensors."""
    from safetensors.torch import load_file, save_file
    path = f"{model_dir}/model.safetensors"
    tensors = load_file(path)
    embed = tensors["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(seed)
    tensors["lm_head.weight"] = torch.randn(embed.shape, generator=gen) / embed.shape[1] ** 0.5
    save_file(tensors, path, metadata={"format": "pt"})


def randomize_weights(model, seed: int) -> None:
    """Weights of unit-scale activations (std 1 / sqrt(fan_in)): logits of order one, so fp32 rounding
    stays far below the 1e-4 tolerance while a mixed-up head or column changes them visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def reference(model, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int], list[float]]:
    """transformers' last-prompt-position logits, its greedy tokens, and the top-2 logit margin at
    each generated position (where the margin is tiny, a rounding difference may pick the other)."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=None)
    logits = [step[0].float() for step in out.logits]
    margins = [float(v[0] - v[1]) for v in (step.topk(2).values for step in logits)]
    return logits[0], out.sequences[0, len(prompt):].tolist(), margins


def agreed_prefix(margins: list[float], tolerance: float) -> int:
    """How many greedy tokens must match: up to and including the first position whose margin is
    below `tolerance` is not required (a near-tie may break either way), everything before it is."""
    for i, m in enumerate(margins):
        if m < tolerance:
            return i
    return len(margins)
