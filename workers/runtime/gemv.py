"""y = x W^T for the few rows of a decode step, in one Triton kernel without split-K, optionally with
the RMSNorm before it and the SiLU(gate) x up after it folded in.

At batch 1-16 a linear layer only streams its weight once. On an H200 (~4.2 TB/s) cuBLAS's choices
for the Llama-3-8B attention and down projections (some split-K, with an extra reduction kernel)
stream 2.1-3.7 TB/s, this kernel 2.4-3.9; MESHSERVE_GEMV=0 turns it off (kernel_ops).
Each program owns BLOCK_N output columns and walks the whole K, reading its weight rows
contiguously; the x rows are padded to the 16 a tensor-core dot needs.

Folding in the neighbours saves a launch each (at batch 1 a launch costs about as much as a 50 MB
linear's tail): with a norm, every program adds the residual itself (the first writes the sum out)
and sums its squares on the way, scaling its dot products by 1/rms at the end (rms(h) W^T(g h) =
W^T(g h / rms(h)); the reference rounds h / rms(h) before the weight g, this rounds g h: the two
differ at the last bit of the activation dtype). Gated: W is [gate | up] and each program holds
both halves' columns, rounding each to the activation dtype before SiLU(gate) * up, as the
separate kernels do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@triton.jit(do_not_specialize=["M"])  # one compiled kernel whatever the row count
def _gemv(x_ptr, res_ptr, norm_ptr, h_ptr, w_ptr, y_ptr, M, N, K, eps, stride_xm, stride_rm, stride_hm,
          stride_wn, stride_ym, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    up_rows = w_ptr + (n[:, None] + N).to(tl.int64) * stride_wn  # GATED: the up half starts at row N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    squares = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_ok = (m[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_ok, other=0.0)
        if NORM:
            if RESIDUAL:  # h = x + residual, rounded as torch's add rounds; program 0 keeps it
                x = (x.to(tl.float32) + tl.load(res_ptr + m[:, None] * stride_rm + k[None, :], mask=x_ok,
                                                 other=0.0).to(tl.float32)).to(x.dtype)
                tl.store(h_ptr + m[:, None] * stride_hm + k[None, :], x, mask=x_ok & (pid == 0))
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, 1)
            g = tl.load(norm_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            x = (xf * g[None, :]).to(x.dtype)
        w_ok = (n[:, None] < N) & (k[None, :] < K)
        acc += tl.dot(x, tl.trans(tl.load(w_rows + k[None, :], mask=w_ok, other=0.0)), input_precision=PRECISION)
        if GATED:
            acc_up += tl.dot(x, tl.trans(tl.load(up_rows + k[None, :], mask=w_ok, other=0.0)),
                             input_precision=PRECISION)
    if NORM:
        rstd = 1.0 / tl.sqrt(squares / K + eps)
        acc = acc * rstd[:, None]
        acc_up = acc_up * rstd[:, None]
    dt = y_ptr.dtype.element_ty
    if GATED:
        gate = acc.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        acc = act * acc_up.to(dt).to(tl.float32)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(dt), mask=(m[:, None] < M) & (n[None, :] < N))


def default_config(norm: bool, gated: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages), from a sweep of the Llama-3-8B decode shapes at tp 1 and 2
    on an H200: 32 weight rows of 512 in flight per program for a plain linear; the gated one's two
    halves stream best 256 wide in 3 stages; with a norm the tiles shrink to 128 wide, where the
    extra float32 tiles of the norm still fit in registers (wider ones spill and run ~10x slower)."""
    if norm:
        return (16, 128, 4, 3) if gated else (32, 128, 4, 4)
    return (32, 256, 4, 3) if gated else (32, 512, 4, 4)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None = None,
         norm: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False, config=None):
    """x [M <= MAX_ROWS, K] (rows contiguous), weight [N, K] -> [M, N] in x's dtype.

    norm: RMSNorm's weight [K]: the input is RMSNorm(h) * norm with h = x + residual (h = x without a
    residual), and the result is (y, h). gated: weight is [gate | up] ([2 I, K]) and y [M, I] is
    SiLU(x gate^T) * (x up^T). config: (BLOCK_N, BLOCK_K, warps, stages) instead of the default."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = x
    if residual is not None:
        assert norm is not None and residual.shape == x.shape and residual.stride(1) == 1
        h = torch.empty_like(x)
    bn, bk, warps, stages = config or default_config(norm is not None, gated)
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    res = residual if residual is not None else x
    _gemv[(triton.cdiv(n, bn),)](
        x, res, norm if norm is not None else x, h, weight, out, m, n, k, eps, x.stride(0), res.stride(0),
        h.stride(0), weight.stride(0), out.stride(0), NORM=norm is not None, RESIDUAL=residual is not None,
        GATED=gated, BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return (out, h) if norm is not None else out
