"""The tensors a build reads from a Llama checkpoint (Hugging Face names) and the shape the config implies.

A checkpoint whose tensors disagree with its config is refused before anything is written: slices are
read by position, so a tensor of another shape would otherwise be cut, or read past, without a word.
"""
from __future__ import annotations

from meshserve.errors import UserError
from meshserve.workers.model_spec import LlamaSpec

# config field -> LlamaSpec attribute, for naming the fields a shape comes from
_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
           "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim"}
_Q = ("num_attention_heads", "head_dim")
_KV = ("num_key_value_heads", "head_dim")


def source_shapes(spec: LlamaSpec) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Each tensor a build reads: its shape, and the config fields that shape comes from."""
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_size, spec.kv_size
    out = {"model.embed_tokens.weight": ((spec.vocab_size, h), ("vocab_size", "hidden_size")),
           "model.norm.weight": ((h,), ("hidden_size",))}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = ((spec.vocab_size, h), ("vocab_size", "hidden_size"))
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        out |= {p + "input_layernorm.weight": ((h,), ("hidden_size",)),
                p + "self_attn.q_proj.weight": ((q, h), _Q + ("hidden_size",)),
                p + "self_attn.k_proj.weight": ((kv, h), _KV + ("hidden_size",)),
                p + "self_attn.v_proj.weight": ((kv, h), _KV + ("hidden_size",)),
                p + "self_attn.o_proj.weight": ((h, q), ("hidden_size",) + _Q),
                p + "post_attention_layernorm.weight": ((h,), ("hidden_size",)),
                p + "mlp.gate_proj.weight": ((i, h), ("intermediate_size", "hidden_size")),
                p + "mlp.up_proj.weight": ((i, h), ("intermediate_size", "hidden_size")),
                p + "mlp.down_proj.weight": ((h, i), ("hidden_size", "intermediate_size"))}
    return out


def check_source_shapes(spec: LlamaSpec, shapes: dict[str, tuple[int, ...]], where: str, config: str) -> None:
    """Refuse a checkpoint (`shapes`: what it holds) that lacks a tensor the build reads, or holds one
    of another shape than its config (`config`, named in the message) implies."""
    want = source_shapes(spec)
    missing = [name for name in want if name not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{where}: tensor {missing[0]}{more} is missing from the checkpoint; is it complete, "
                        f"and does {config} give the right num_hidden_layers and tie_word_embeddings?")
    for name, (shape, fields) in want.items():
        if tuple(shapes[name]) != shape:
            said = ", ".join(f"{f}={getattr(spec, _FIELDS[f])}" for f in dict.fromkeys(fields))
            raise UserError(f"{where}: tensor {name} has shape {list(shapes[name])}, but {config} ({said}) "
                            f"implies {list(shape)}; the weights do not match {config}: fix {config} or the "
                            "weights")
