"""y = x W^T for the few rows of a decode step, in one Triton kernel without split-K.

At batch 1-16 a linear layer only streams its weight once. On an H200 (~4.2 TB/s) cuBLAS's choices
for the Llama-3-8B attention and down projections (some split-K, with an extra reduction kernel)
stream 2.1-3.7 TB/s, this kernel 2.4-3.9; MESHSERVE_GEMV=0 turns it off (kernel_ops).
Each program owns BLOCK_N output columns and walks the whole K, reading its weight rows
contiguously; the x rows are padded to the 16 a tensor-core dot needs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@triton.jit(do_not_specialize=["M"])  # one compiled kernel whatever the row count
def _gemv(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] (rows contiguous), weight [N, K] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, 32),)](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                                 BLOCK_M=MAX_ROWS, BLOCK_N=32, BLOCK_K=min(512, max(16, triton.next_power_of_2(k))),
                                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4, num_stages=4)
    return out
