"""The operations of a decoder layer between its matmuls and collectives, in two implementations:
TorchOps (plain PyTorch, one sequence at a time in attention: the CPU path and the reference) and
TritonOps (batched paged attention and fused kernels: the GPU path).

MESHSERVE_KERNELS=reference|triton forces one (triton on CPU needs TRITON_INTERPRET=1 and is slow:
it exists so the kernels can be tested without a GPU).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from meshserve.errors import UserError
from meshserve.workers.runtime.attention_reference import reference_attention
from meshserve.workers.runtime.parallel_layers import plain_matmul
from meshserve.workers.runtime.rope import apply_rope


class TorchOps:
    name = "reference"
    matmul = staticmethod(plain_matmul)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
        """(RMSNorm(h) * weight, h) with h = x + residual (h = x without one)."""
        h = x if residual is None else x + residual
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * hf.to(h.dtype), h

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @classmethod
    def gated_matmul(cls, x, weight):
        """SiLU(x gate^T) * (x up^T) for weight = [gate | up]."""
        return cls.silu_mul(cls.matmul(x, weight))

    @staticmethod
    def rope_write_kv(qkv, cos_table, sin_table, step, cache, layer: int, q_heads: int, kv_heads: int,
                      head_dim: int) -> torch.Tensor:
        """Rotate q and k by position, store k and v in the step's KV slots; returns q [T, Hq, D]."""
        q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        cos, sin = cos_table[step.positions], sin_table[step.positions]
        q = apply_rope(q.view(-1, q_heads, head_dim), cos, sin)
        k = apply_rope(k.view(-1, kv_heads, head_dim), cos, sin)
        cache.write(layer, step.slot_mapping, k, v.view(-1, kv_heads, head_dim))
        return q

    attend = staticmethod(reference_attention)


class TritonOps(TorchOps):
    name = "triton"

    @staticmethod
    def matmul(x, weight):
        """Decode-sized row counts through the Triton kernel; MESHSERVE_GEMV=0 keeps torch's for all."""
        from meshserve.workers.runtime.gemv import gemv
        return gemv(x, weight) if _gemv_fits(x) else x @ weight.t()

    @classmethod
    def gated_matmul(cls, x, weight):
        """Decode-sized row counts: the linear and SiLU(gate) x up in one Triton kernel."""
        if _gemv_fits(x) and _GEMV_FUSED:
            from meshserve.workers.runtime.gemv import gemv
            return gemv(x, weight, gated=True)
        return super().gated_matmul(x, weight)

    @staticmethod
    def add_rms_norm(x, residual, weight, eps):
        from meshserve.workers.runtime.fused_kernels import add_rms_norm
        return add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def silu_mul(gate_up):
        from meshserve.workers.runtime.fused_kernels import silu_mul
        return silu_mul(gate_up)

    @staticmethod
    def rope_write_kv(qkv, cos_table, sin_table, step, cache, layer, q_heads, kv_heads, head_dim):
        from meshserve.workers.runtime.fused_kernels import rope_write_kv
        return rope_write_kv(qkv, cos_table, sin_table, step.positions, step.slot_mapping, cache.k[layer],
                             cache.v[layer], q_heads, kv_heads, head_dim)

    @staticmethod
    def attend(q, k_pool, v_pool, step):
        from meshserve.workers.runtime.paged_attention import paged_attention
        return paged_attention(q, k_pool, v_pool, step.query_start, step.seq_lens, step.block_tables,
                               step.max_query_len, max_context=step.max_context)


_GEMV = os.environ.get("MESHSERVE_GEMV", "1") != "0"
# MESHSERVE_GEMV=unfused: the Triton linear alone, SiLU x up in a kernel of its own
_GEMV_FUSED = os.environ.get("MESHSERVE_GEMV", "1") != "unfused"


def _gemv_fits(x: torch.Tensor) -> bool:
    from meshserve.workers.runtime.gemv import MAX_ROWS
    return _GEMV and x.shape[0] <= MAX_ROWS and x.stride(-1) == 1


def select_ops(device: torch.device):
    """TritonOps on GPU, TorchOps on CPU, unless MESHSERVE_KERNELS says otherwise."""
    want = os.environ.get("MESHSERVE_KERNELS", "auto")
    if want not in ("auto", "reference", "triton"):
        raise UserError(f"MESHSERVE_KERNELS={want!r} is not allowed: use auto, reference or triton")
    if want == "triton" or (want == "auto" and device.type == "cuda"):
        return TritonOps
    return TorchOps
