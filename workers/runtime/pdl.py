"""Programmatic dependent launch (Hopper and later) for the decode kernels.

A batch-1 decode step is a chain of ~290 kernels, most of them a few microseconds long; between two of
them the GPU otherwise drains the first, then launches and ramps up the second. Launched with PDL, a
kernel's programs may become resident while the kernel before it still runs: each program first lets
its own successor launch (`launch_dependents`) and then waits (`griddepcontrol.wait`) until the kernel
before it has finished and its writes are visible, so nothing it reads or writes is touched early;
the waiting is transitive, every PDL kernel waits. Measured on an H200 (8B, batch 1): 229.3-229.4 tok/s
without, 236.5-236.8 with. (Prefetching a GEMV's first weight columns into L2 before its wait, while the
small kernels before it leave memory idle, was tried: 2 KB per weight row gave 233, 8 KB 199 — the
early programs of the next GEMV then compete with the running one's stream.)

Kernels without the wait are launched the usual way. `MESHSERVE_PDL=0` turns it off.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.lru_cache(maxsize=None)
def enabled(device: torch.device) -> bool:
    """PDL for kernels on `device`: an NVIDIA GPU of compute capability 9 or later (ROCm's GPUs report
    capabilities of their own), not interpreted."""
    return (device.type == "cuda" and torch.version.hip is None and os.environ.get("MESHSERVE_PDL", "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_args(device: torch.device) -> dict:
    """The keyword arguments a kernel with `wait_for_previous(PDL)` is launched with on `device`."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Let the next kernel launch, then wait until the previous one has finished (no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
