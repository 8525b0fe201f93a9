"""Which slice of which source tensor each rank file holds (the TensorRT-LLM checkpoint layout).

Source names follow Hugging Face Llama (`model.layers.{i}.self_attn.q_proj.weight`, ...); output names
follow TensorRT-LLM (`transformer.layers.{i}.attention.qkv.weight`, with `i` local to the stage).
"""
from __future__ import annotations

from dataclasses import dataclass

from meshserve.errors import UserError
from meshserve.workers.model_spec import LlamaSpec, round_up


@dataclass(frozen=True)
class Piece:
    """Rows/cols [start, stop) of source tensor `source` along `dim` (dim None: the whole tensor)."""
    source: str
    dim: int | None = None
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class RankTensor:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]  # concatenated along dim 0, then zero padding appended
    pad_rows: int = 0          # zero rows appended after the pieces
    pad_cols: int = 0          # zero columns appended (a single piece sliced along dim 1, or none)


def check_layout(spec: LlamaSpec, tp: int, pp: int) -> None:
    """Refuse layouts the model cannot be split into: tp must divide the attention heads, and tp and
    the KV heads must divide one another (KV heads split evenly, or each is duplicated on
    tp / kv_heads ranks); pp must not exceed the layers. Every other size is padded."""
    heads, kv = spec.num_heads, spec.num_kv_heads
    works = ", ".join(str(t) for t in valid_tp_sizes(heads, kv))
    if heads % tp:
        raise UserError(f"parallel.tp={tp} does not divide num_attention_heads={heads}; "
                        f"tp values that work for this model: {works}")
    if kv % tp and tp % kv:
        raise UserError(f"parallel.tp={tp} and num_key_value_heads={kv} do not divide one another, "
                        f"so KV heads cannot be split or duplicated evenly; tp values that work for this "
                        f"model: {works}")
    if pp > spec.num_layers:
        raise UserError(f"parallel.pp={pp} exceeds num_hidden_layers={spec.num_layers}; "
                        f"use pp <= {spec.num_layers}")


def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Every tp that splits the attention heads evenly and splits or duplicates the KV heads evenly."""
    return [t for t in range(1, num_heads + 1)
            if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Layers of a pipeline stage; when pp does not divide, the first stages get one more."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def kv_heads_of(spec: LlamaSpec, tp: int, tp_rank: int) -> range:
    """KV heads held by tp_rank: an even split, or one duplicated head when tp > num_kv_heads."""
    if tp <= spec.num_kv_heads:
        per = spec.num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank * spec.num_kv_heads // tp
    return range(head, head + 1)


def padded_vocab(spec: LlamaSpec, tp: int) -> int:
    return round_up(spec.vocab_size, tp)


def split_range(size: int, tp: int, tp_rank: int) -> tuple[int, int, int]:
    """(start, stop, pad) of tp_rank's share when `size` is padded up to a multiple of tp: real
    indices [start, stop) followed by `pad` zero entries; every rank holds ceil(size / tp)."""
    per = -(-size // tp)
    start = min(tp_rank * per, size)
    stop = min(start + per, size)
    return start, stop, per - (stop - start)


def mesh_coords(rank: int, tp: int) -> tuple[int, int]:
    """(pp_stage, tp_rank) of a global rank: TP groups are contiguous ranks, so they stay in a node."""
    return divmod(rank, tp)


def rank_tensors(spec: LlamaSpec, tp: int, pp: int, rank: int) -> list[RankTensor]:
    stage, tpr = mesh_coords(rank, tp)
    hd, hidden, inter = spec.head_dim, spec.hidden_size, spec.intermediate_size
    q_per = spec.num_heads // tp
    kv = kv_heads_of(spec, tp, tpr)
    i_per = round_up(inter, tp) // tp  # MLP columns past `inter` are zero: SiLU(0) * 0 adds nothing
    i_lo, i_hi, i_pad = split_range(inter, tp, tpr)
    h_per = spec.num_heads * hd // tp
    out: list[RankTensor] = []

    def whole(name, src, shape):
        out.append(RankTensor(name, tuple(shape), (Piece(src),)))

    if stage == 0:
        whole("transformer.vocab_embedding.weight", "model.embed_tokens.weight", (spec.vocab_size, hidden))
    for local, layer in enumerate(stage_layers(spec.num_layers, pp, stage)):
        src = f"model.layers.{layer}."
        dst = f"transformer.layers.{local}."
        whole(dst + "input_layernorm.weight", src + "input_layernorm.weight", (hidden,))
        qkv = (Piece(src + "self_attn.q_proj.weight", 0, tpr * q_per * hd, (tpr + 1) * q_per * hd),
               Piece(src + "self_attn.k_proj.weight", 0, kv.start * hd, kv.stop * hd),
               Piece(src + "self_attn.v_proj.weight", 0, kv.start * hd, kv.stop * hd))
        out.append(RankTensor(dst + "attention.qkv.weight", ((q_per + 2 * len(kv)) * hd, hidden), qkv))
        out.append(RankTensor(dst + "attention.dense.weight", (hidden, h_per),
                              (Piece(src + "self_attn.o_proj.weight", 1, tpr * h_per, (tpr + 1) * h_per),)))
        whole(dst + "post_layernorm.weight", src + "post_attention_layernorm.weight", (hidden,))
        for name, proj in (("fc", "gate_proj"), ("gate", "up_proj")):
            out.append(RankTensor(dst + f"mlp.{name}.weight", (i_per, hidden),
                                  _nonempty(Piece(src + f"mlp.{proj}.weight", 0, i_lo, i_hi)), pad_rows=i_pad))
        out.append(RankTensor(dst + "mlp.proj.weight", (hidden, i_per),
                              _nonempty(Piece(src + "mlp.down_proj.weight", 1, i_lo, i_hi)), pad_cols=i_pad))
    if stage == pp - 1:
        whole("transformer.ln_f.weight", "model.norm.weight", (hidden,))
        v_per = padded_vocab(spec, tp) // tp
        start, stop, pad = split_range(spec.vocab_size, tp, tpr)
        head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        out.append(RankTensor("lm_head.weight", (v_per, hidden), _nonempty(Piece(head, 0, start, stop)),
                              pad_rows=pad))
    return out


def _nonempty(piece: Piece) -> tuple[Piece, ...]:
    """The piece, or nothing when a rank's share is all padding (a size barely above a multiple of tp)."""
    return (piece,) if piece.stop > piece.start else ()
