"""y = x W^T for the few rows of a decode step, in one Triton kernel without split-K; gated, the
SiLU(gate) x up after it folded in.

At batch 1-16 a linear layer only streams its weight once. On an H200 (~4.2 TB/s) cuBLAS's choices
for the Llama-3-8B attention and down projections (some split-K, with an extra reduction kernel)
stream 2.1-3.7 TB/s, this kernel 2.4-3.9; MESHSERVE_GEMV=0 turns it off (kernel_ops).
Each program owns BLOCK_N output columns and walks the whole K, reading its weight rows
contiguously; the x rows are padded to the 16 a tensor-core dot needs.

Gated: W is [gate | up] and each program holds both halves' columns (64 weight rows in flight:
4.0 TB/s on the 8B MLP against 3.7 for the plain kernel), rounding each to the activation dtype
before SiLU(gate) * up as the separate kernels do; it also saves the SiLU launch.
(Folding the RMSNorm in front as well was tried: its float32 tiles, padded to 16 rows, spill
registers or stall the weight stream, 3-10x slower, and its rounding cost bf16 agreement.)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from meshserve.workers.runtime import pdl
from meshserve.workers.runtime.pdl import wait_for_previous

MAX_ROWS = 16


@triton.jit(do_not_specialize=["M"])  # one compiled kernel whatever the row count
def _gemv(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, GATED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
          PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    up_rows = w_ptr + (n[:, None] + N).to(tl.int64) * stride_wn  # GATED: the up half starts at row N
    wait_for_previous(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w_ok = (n[:, None] < N) & (k[None, :] < K)
        acc += tl.dot(x, tl.trans(tl.load(w_rows + k[None, :], mask=w_ok, other=0.0)), input_precision=PRECISION)
        if GATED:
            acc_up += tl.dot(x, tl.trans(tl.load(up_rows + k[None, :], mask=w_ok, other=0.0)),
                             input_precision=PRECISION)
    dt = y_ptr.dtype.element_ty
    if GATED:
        gate = acc.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        acc = act * acc_up.to(dt).to(tl.float32)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(dt), mask=(m[:, None] < M) & (n[None, :] < N))


def default_config(n: int, gated: bool, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for n output columns on `sms` SMs, from a sweep of the
    Llama-3-8B decode shapes at tp 1 and 2 on an H200 (`meshserve bench gemv`, in benchmarks/results):
    32 weight rows of 512 per program, except that one wave of 64-row programs beats a second wave
    that leaves most SMs idle (qkv at tp 1: 192 programs on 132 SMs, 18.5 us; 96 programs, 15.2)."""
    if gated:
        return (32, 256, 4, 3)
    if triton.cdiv(n, 32) > sms >= triton.cdiv(n, 64):
        return (64, 256, 4, 4)
    return (32, 512, 4, 4)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def gemv(x: torch.Tensor, weight: torch.Tensor, *, gated: bool = False, config=None) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] (rows contiguous), weight [N, K] -> [M, N] in x's dtype. gated: weight is
    [gate | up] ([2 I, K]) and the result [M, I] is SiLU(x gate^T) * (x up^T). config: (BLOCK_N,
    BLOCK_K, warps, stages) instead of the default."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config or default_config(n, gated, _sm_count(x.device))
    bk = bk * 2 // x.element_size()  # the configs are for 2-byte activations: float32 tiles as many bytes
    _gemv[(triton.cdiv(n, bn),)](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), GATED=gated,
                                 BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=min(bk, max(16, triton.next_power_of_2(k))),
                                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps,
                                 num_stages=stages, **pdl.launch_args(x.device))
    return out
