"""Triton kernels for what sits between the matmuls of a decoder layer, one launch each where eager
PyTorch needs five to fifteen: residual add + RMSNorm, SiLU(gate) x up, and RoPE on q and k with
the new keys and values written straight into the paged KV pool.

Each rounds to the activation dtype where the reference ops (kernel_ops.TorchOps) round, so the two
differ only by the order of float32 sums and the last bit of exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.workers.runtime import pdl
from meshserve.workers.runtime.pdl import wait_for_previous


@triton.jit
def _add_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, n, stride_x, stride_res, stride_out,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # h = x + residual, rounded to the activation dtype as torch's add does
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(RMSNorm(h) * weight, h) with h = x + residual (h = x without one)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm[(rows,)](x, residual if residual is not None else x, weight, out, res_out, eps, n,
                           x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0),
                           HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                           **pdl.launch_args(x.device))
    return out, res_out


@triton.jit
def _silu_mul(gu_ptr, out_ptr, inter, stride_gu, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] of shape [T, 2 * inter]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul[(rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), BLOCK=block)
    return out


@triton.jit
def _rope_write_kv(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, stride_qkv, stride_table,
                   stride_slot, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    dt = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_table + d, mask=ok, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_table + d, mask=ok, other=0.0).to(dt).to(tl.float32)
    src = qkv_ptr + tok * stride_qkv + head * 2 * HALF
    x1 = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0).to(tl.float32)
    # out = x * cos + rotate_half(x) * sin, each product and the sum rounded as torch rounds them
    o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    if head < Q_HEADS:
        dst = q_ptr + (tok * Q_HEADS + head) * 2 * HALF
        tl.store(dst + d, o1, mask=ok)
        tl.store(dst + HALF + d, o2, mask=ok)
    else:
        kv_head = head - Q_HEADS
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        dst = k_ptr + slot * stride_slot + kv_head * 2 * HALF
        tl.store(dst + d, o1, mask=ok)
        tl.store(dst + HALF + d, o2, mask=ok)
        v_src = qkv_ptr + tok * stride_qkv + (Q_HEADS + KV_HEADS + kv_head) * 2 * HALF
        v_dst = v_ptr + slot * stride_slot + kv_head * 2 * HALF
        tl.store(v_dst + d, tl.load(v_src + d, mask=ok, other=0.0), mask=ok)
        tl.store(v_dst + HALF + d, tl.load(v_src + HALF + d, mask=ok, other=0.0), mask=ok)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, q_heads: int, kv_heads: int,
                  head_dim: int) -> torch.Tensor:
    """qkv [T, (Hq + 2 KV) * D] -> rotated q [T, Hq, D]; the rotated keys and the values go to their
    slots of k_pool / v_pool ([blocks, block_size, KV, D], one layer)."""
    t = qkv.shape[0]
    q = torch.empty(t, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    _rope_write_kv[(t, q_heads + kv_heads)](
        qkv, cos, sin, positions, slots, q, k_pool, v_pool, qkv.stride(0), cos.stride(0),
        kv_heads * head_dim, Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half, BLOCK=triton.next_power_of_2(half),
        **pdl.launch_args(qkv.device))
    return q


@triton.jit
def _chunk_argmax(x_ptr, val_ptr, idx_ptr, n, stride_x, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    best = tl.argmax(x, 0, tie_break_left=True)
    tl.store(val_ptr + row * CHUNKS + chunk, tl.max(x, 0))
    tl.store(idx_ptr + row * CHUNKS + chunk, chunk * BLOCK + best)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> int64 [B], the first index of each row's maximum: the maximum of each chunk
    of BLOCK columns, then the first chunk holding the largest."""
    rows, n = logits.shape
    block = 2048
    chunks = triton.cdiv(n, block)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int64, device=logits.device)
    _chunk_argmax[(rows, chunks)](logits, vals, idx, n, logits.stride(0), CHUNKS=chunks, BLOCK=block)
    return idx.gather(1, vals.argmax(dim=1, keepdim=True))[:, 0]
