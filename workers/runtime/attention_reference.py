"""The reference attention: one plain `scaled_dot_product_attention` per sequence over its K and V
gathered out of the paged pool. Slow and obviously right: the CPU path, and the oracle the batched
paged-attention kernel is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step) -> torch.Tensor:
    """q [T, H, D]; k_pool, v_pool [blocks, block_size, KV, D] for one layer; step: StepInputs (its
    host query_lens / context_lens). Returns [T, H, D]."""
    block_size = k_pool.shape[1]
    outs, start = [], 0
    for i, (n, ctx) in enumerate(zip(step.query_lens, step.context_lens)):
        blocks = step.block_tables[i, : -(-ctx // block_size)]
        keys = k_pool[blocks].flatten(0, 1)[:ctx].transpose(0, 1)[None]      # [1, KV, ctx, D]
        values = v_pool[blocks].flatten(0, 1)[:ctx].transpose(0, 1)[None]
        qi = q[start:start + n].transpose(0, 1)[None]                        # [1, H, n, D]
        mask = None
        if n > 1:  # query j sits at position ctx - n + j and sees keys up to it
            mask = (torch.arange(ctx, device=q.device)[None, :]
                    <= (ctx - n + torch.arange(n, device=q.device))[:, None])
        o = F.scaled_dot_product_attention(qi, keys, values, attn_mask=mask, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs, 0)
