"""How many KV blocks a rank gets: what the engine asks for, capped by the GPU memory left once the
weights are loaded, less room for the largest step's activations and the decode graphs; then the
minimum over ranks, since every rank must address the same block ids."""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshserve.errors import UserError
from meshserve.workers.runtime.kv_cache import KVCache


def activation_bytes(meta, tp: int, dtype: torch.dtype) -> int:
    """A generous bound on the transient memory of the largest step (prefill of max_num_tokens
    tokens, one layer's intermediates at a time) plus the float32 logits and sampler work of the
    largest batch, twice over for the graphs' outputs."""
    spec, size = meta.spec, torch.empty((), dtype=dtype).element_size()
    per_token = (4 * spec.intermediate_size // tp + 3 * spec.num_heads * spec.head_dim // tp
                 + 6 * spec.hidden_size) * size
    return meta.max_num_tokens * per_token + 2 * meta.max_batch_size * spec.vocab_size * 32


def prompt_rows_per_step(meta, tp: int, dtype: torch.dtype) -> int:
    """Most prompt-logprob rows one step scores. Each row's logits span the vocabulary (float32, in
    about four copies on the last stage: the slices, their gather, the log-softmax), so the rows are
    held to the room kept for a step's activations (at least a batch's rows, which that room holds
    by itself), and to max_num_tokens."""
    rows = activation_bytes(meta, tp, dtype) // (16 * meta.spec.vocab_size)
    return max(1, min(meta.max_num_tokens, max(meta.max_batch_size, rows)))


def agree_on_blocks(meta, mesh, num_layers: int, kv_heads: int, dtype: torch.dtype, fraction: float) -> int:
    """meta.num_kv_blocks when set (refused if this GPU cannot hold them), else enough for
    max_batch_size full sequences capped by `fraction` of the free GPU memory less the activations."""
    blocks = meta.num_kv_blocks or meta.max_batch_size * -(-meta.max_seq_len // meta.kv_block_size) + 1
    if mesh.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(mesh.device)
        per = KVCache.bytes_per_block(max(1, num_layers), meta.kv_block_size, kv_heads, meta.spec.head_dim, dtype)
        room = int(free * fraction) - activation_bytes(meta, mesh.tp, dtype)
        fits = max(0, room) // per
        if meta.num_kv_blocks and fits < meta.num_kv_blocks:
            raise UserError(f"num_kv_blocks={meta.num_kv_blocks} does not fit on rank {mesh.rank}'s GPU "
                            f"(room for {fits}); ask for fewer")
        if fits < 2:
            raise UserError(f"rank {mesh.rank}'s GPU has no room for a KV cache after the weights "
                            f"({free / 2**30:.1f} GiB free); lower max_num_tokens or max_batch_size, or use more GPUs")
        blocks = min(blocks, fits)
    if mesh.world_size > 1:
        t = torch.tensor([blocks], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=mesh.control_group)
        blocks = int(t.item())
    return blocks
