"""The fused Triton kernels (TritonOps) agree with the plain PyTorch ops (TorchOps) they replace, on
random shapes: in Triton's interpreter on CPU, natively on GPU."""
from __future__ import annotations

import random

import pytest
import torch

from meshserve.workers.runtime.kernel_ops import TorchOps, TritonOps
from meshserve.workers.runtime.kv_cache import KVCache
from meshserve.workers.runtime.rope import rope_tables
from meshserve.workers.runtime.step_inputs import StepInputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float16 stands for half precision in the interpreter, whose bfloat16 support is incomplete
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16
TOL = {torch.float32: 2e-6, HALF: 1e-2}
# a float32 dot of 1536 terms summed in another order than cuBLAS's differs by a few 1e-6
GEMV_TOL = {torch.float32: 2e-5}


def close(got, want, dtype, what, tol=None):
    err = ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()
    assert err <= (tol or TOL[dtype]), f"{what}: relative error {err} in {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_add_rms_norm(dtype):
    rng = random.Random(1)
    for _ in range(4):
        t, n = rng.randint(1, 9), rng.choice([16, 64, 100, 576, 4096])
        x, res = (torch.randn(t, n, device=DEVICE).to(dtype) for _ in range(2))
        w = torch.rand(n, device=DEVICE).to(dtype) + 0.5
        for residual in (None, res):
            got, got_h = TritonOps.add_rms_norm(x, residual, w, 1e-5)
            want, want_h = TorchOps.add_rms_norm(x, residual, w, 1e-5)
            assert torch.equal(got_h, want_h), "the residual sum is one rounded add in both"
            close(got, want, dtype, f"norm of [{t}, {n}]")


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_silu_mul(dtype):
    for t, inter in ((1, 96), (5, 1000), (3, 2048)):
        gate_up = (torch.randn(t, 2 * inter, device=DEVICE) * 3).to(dtype)
        close(TritonOps.silu_mul(gate_up), TorchOps.silu_mul(gate_up), dtype, f"silu_mul [{t}, {inter}]")


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_gemv_matches_matmul(dtype):
    """Decode-sized linears: any row count up to the kernel's, widths off its block sizes."""
    from meshserve.workers.runtime.gemv import MAX_ROWS
    rng = random.Random(2)
    for m, n, k in [(1, 32, 16), (MAX_ROWS, 70, 100), (3, 576, 1000), (rng.randint(1, MAX_ROWS), 33, 1536)]:
        x = torch.randn(m, k, device=DEVICE).to(dtype)
        w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
        got = TritonOps.matmul(x, w)
        assert got.shape == (m, n) and got.dtype == dtype
        close(got, TorchOps.matmul(x, w), dtype, f"[{m}, {k}] x [{n}, {k}]^T", tol=GEMV_TOL.get(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_gated_gemv_matches_the_linear_then_silu_mul(dtype):
    """SiLU(gate) x up folded into the linear: the same as the two ops, any row count and width."""
    rng = random.Random(3)
    for m, n, k in [(1, 48, 64), (rng.randint(2, 16), 70, 200), (16, 33, 1536)]:
        x = torch.randn(m, k, device=DEVICE).to(dtype)
        w = (torch.randn(2 * n, k, device=DEVICE) / k ** 0.5).to(dtype)
        got = TritonOps.gated_matmul(x, w)
        assert got.shape == (m, n) and got.dtype == dtype
        close(got, TorchOps.gated_matmul(x, w), dtype, f"gated [{m}, {k}] x [{2 * n}, {k}]^T", tol=GEMV_TOL.get(dtype))


def test_gemv_config_takes_one_wave_of_wide_programs_over_a_partial_second():
    from meshserve.workers.runtime.gemv import default_config
    assert default_config(6144, False, 132)[0] == 64      # 192 programs of 32 rows would need 1.45 waves
    assert default_config(4096, False, 132)[0] == 32      # 128 programs: one wave already
    assert default_config(28672, False, 132)[0] == 32     # many waves: the last one matters little
    assert default_config(14336, True, 132) == (32, 256, 4, 3)


def test_chunked_argmax_is_torch_argmax_ties_included():
    """Rows wider than a chunk, maxima repeated within and across chunks, -inf rows: the first index."""
    from meshserve.workers.runtime.fused_kernels import argmax_rows
    g = torch.Generator().manual_seed(4)
    for rows, n in ((1, 5000), (3, 2048), (4, 4097), (2, 17)):
        x = torch.randint(-3, 4, (rows, n), generator=g).float()  # few values: many ties
        x[0, :] = float("-inf")
        if rows > 1 and n > 4096:
            x[1, :] = -5.0
            x[1, [3000, 4096]] = 9.0  # tie across chunks: the first chunk's wins
        x = x.to(DEVICE)
        assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist(), (rows, n)


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (4, 4, 12), (32, 8, 128), (6, 1, 64)])
def test_rope_write_kv(dtype, heads, kv_heads, head_dim):
    """Same q, and the same keys and values in the same slots (every other slot untouched)."""
    t, block_size, blocks = 7, 4, 10
    cos, sin = rope_tables(head_dim, 10000.0, None, 64, DEVICE)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    positions = torch.tensor([0, 1, 2, 30, 31, 63, 5], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([4, 5, 6, 13, 36, 39, 21], dtype=torch.int32, device=DEVICE)
    step = StepInputs(None, positions, slots, None, None, None, None, 1, [], [])
    caches = []
    for ops in (TorchOps, TritonOps):
        cache = KVCache(2, blocks, block_size, kv_heads, head_dim, dtype, DEVICE)
        cache.k.fill_(-3.0)
        cache.v.fill_(-3.0)
        caches.append((ops.rope_write_kv(qkv, cos, sin, step, cache, 1, heads, kv_heads, head_dim), cache))
    (want_q, want), (got_q, got) = caches
    close(got_q, want_q, dtype, "q")
    close(got.k, want.k, dtype, "k pool")
    assert torch.equal(got.v, want.v), "values are copied, not computed"
    assert (got.k[0] == -3.0).all() and (got.k[1].view(-1, kv_heads, head_dim)[0] == -3.0).all()
