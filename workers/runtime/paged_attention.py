"""Paged attention for a packed batch in one Triton kernel call per layer: prefill and decode rows
alike, causal, reading K and V straight from the paged pool through the block tables.

One program handles one sequence, one KV head and a tile of BLOCK_M query rows, where a row is one
(query token, query head of that KV head's group) pair: a decode token's G grouped heads share
the keys they load, so grouped-query attention reads the pool once per KV head. Scores are
accumulated in float32 with an online softmax (running max and sum), as flash attention does.

Decode-only steps with few (sequence, KV head) pairs would leave most of the GPU idle, one program
walking a whole context: there the keys of each sequence are split into `splits` chunks, one
program each, whose partial softmax states (max, sum, weighted values) a second kernel combines.
The split count depends only on the batch size, so a CUDA graph of one bucket always runs the same.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from meshserve.workers.runtime import pdl
from meshserve.workers.runtime.pdl import wait_for_previous


# Triton compiles a kernel again for each new "is 1 / divisible by 16" pattern of its integer
# arguments; the block-table width changes with the longest context of an eager step, and a compile
# in the middle of serving stalls every request for a second: that argument is not specialised.
@triton.jit(do_not_specialize=["stride_table"])
def _paged_attention(q_ptr, k_ptr, v_ptr, o_ptr, query_start_ptr, seq_lens_ptr, tables_ptr, scale,
                     stride_qt, stride_qh, stride_slot, stride_kh, stride_ot, stride_oh, stride_table,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    seq, kv_head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len * GROUP:
        ctx = tl.load(seq_lens_ptr + seq)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = tok < q_len
        pos = ctx - q_len + tok                     # each query row's position: it sees keys 0..pos
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: fully masked rows stay NaN-free
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        last_tok = tl.minimum(q_len - 1, (tile * BLOCK_M + BLOCK_M - 1) // GROUP)
        num_keys = ctx - q_len + last_tok + 1         # keys the tile's last row sees
        for start in range(0, num_keys, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < num_keys
            block = tl.load(tables_ptr + seq * stride_table + keys // KV_BLOCK, mask=key_ok, other=0)
            slot = block.to(tl.int64) * KV_BLOCK + keys % KV_BLOCK
            k = tl.load(k_ptr + slot[None, :] * stride_slot + kv_head * stride_kh + d[:, None],
                        mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            s = tl.where(key_ok[None, :] & (keys[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slot[:, None] * stride_slot + kv_head * stride_kh + d[None, :],
                        mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["stride_table"])
def _paged_decode_split(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, seq_lens_ptr, tables_ptr, scale,
                        stride_qt, stride_qh, stride_slot, stride_kh, stride_table,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLITS: tl.constexpr, HEADS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """One decode token per sequence: program (seq, kv_head, split) covers one chunk of the keys
    and writes its unnormalised partial state to m / l [B, H, SPLITS] and acc [B, H, SPLITS, D]."""
    wait_for_previous(PDL)
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        block = tl.load(tables_ptr + seq * stride_table + keys // KV_BLOCK, mask=key_ok, other=0)
        slot = block.to(tl.int64) * KV_BLOCK + keys % KV_BLOCK
        k = tl.load(k_ptr + slot[None, :] * stride_slot + kv_head * stride_kh + d[:, None],
                    mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_slot + kv_head * stride_kh + d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    part = (seq * HEADS + head) * SPLITS + split
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_splits(m_ptr, l_ptr, acc_ptr, o_ptr, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, HEADS: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    seq, head = tl.program_id(0), tl.program_id(1)
    part = (seq * HEADS + head) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(m_ptr + part)
    l = tl.load(l_ptr + part)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=d_ok[None, :], other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(o_ptr + seq * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


def decode_splits(num_seqs: int, kv_heads: int) -> int:
    """Chunks per context for a decode-only step: enough programs to occupy a GPU's ~100+ cores."""
    programs = num_seqs * kv_heads
    return 1 if programs >= 128 else min(16, triton.next_power_of_2(-(-256 // programs)))


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, query_start: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                    out: torch.Tensor | None = None, max_context: int | None = None) -> torch.Tensor:
    """q [T, H, D] (the batch's new tokens, packed); k_pool, v_pool [blocks, block_size, KV, D] (one
    layer of the pool, already holding this step's keys); query_start int32 [B + 1] (offsets of each
    sequence's tokens in q); seq_lens int32 [B] (keys per sequence, the new ones included);
    block_tables int32 [B, M]; max_query_len: the most new tokens of any sequence (sizes the grid;
    rows past a sequence's own count do nothing); max_context: the most keys of any sequence when known
    (no more context splits than 32-key tiles then). Returns o [T, H, D] in q's dtype."""
    t, heads, head_dim = q.shape
    num_blocks, kv_block, kv_heads, _ = k_pool.shape
    group = heads // kv_heads
    k_flat, v_flat = k_pool.view(num_blocks * kv_block, kv_heads, head_dim), v_pool.view(-1, kv_heads, head_dim)
    out = torch.empty_like(q) if out is None else out
    block_d = max(16, triton.next_power_of_2(head_dim))
    batch = block_tables.shape[0]
    # one token per sequence (a fork row has none: then the rows are not the sequences)
    splits = decode_splits(batch, kv_heads) if max_query_len == 1 and t == batch and group <= 64 else 1
    if max_context is not None:
        splits = min(splits, triton.next_power_of_2(triton.cdiv(max_context, 32)))
    if splits > 1:
        launch = pdl.launch_args(q.device)
        m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        l, acc = torch.empty_like(m), torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        _paged_decode_split[(batch, kv_heads, splits)](
            q, k_flat, v_flat, m, l, acc, seq_lens, block_tables, 1.0 / math.sqrt(head_dim),
            q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, KV_BLOCK=kv_block,
            BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_N=32, SPLITS=splits, HEADS=heads,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **launch)
        _combine_splits[(batch, heads)](m, l, acc, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                                        BLOCK_D=block_d, SPLITS=splits, HEADS=heads, **launch)
        return out
    block_m = 16 if max_query_len * group <= 16 else 64
    block_n = 64  # keys per inner step, gathered one by one through the table: any KV block size
    grid = (block_tables.shape[0], kv_heads, triton.cdiv(max(1, max_query_len) * group, block_m))
    _paged_attention[grid](
        q, k_flat, v_flat, out, query_start, seq_lens, block_tables, 1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, KV_BLOCK=kv_block,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out
