"""Which attention a rank runs: the batched paged kernel (Triton) on GPU, the reference on CPU.

MESHSERVE_ATTENTION=reference|paged forces one (paged on CPU needs TRITON_INTERPRET=1 and is slow:
it exists so the kernel can be tested without a GPU)."""
from __future__ import annotations

import os

import torch

from meshserve.errors import UserError
from meshserve.workers.runtime.attention_reference import reference_attention


def paged_step_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step) -> torch.Tensor:
    from meshserve.workers.runtime.paged_attention import paged_attention
    return paged_attention(q, k_pool, v_pool, step.query_start, step.seq_lens, step.block_tables,
                           step.max_query_len)


def select_attention(device: torch.device):
    """The attention function for a rank on `device`: f(q, k_pool, v_pool, step) -> [T, H, D]."""
    want = os.environ.get("MESHSERVE_ATTENTION", "auto")
    if want not in ("auto", "reference", "paged"):
        raise UserError(f"MESHSERVE_ATTENTION={want!r} is not allowed: use auto, reference or paged")
    if want == "paged" or (want == "auto" and device.type == "cuda"):
        return paged_step_attention
    return reference_attention
