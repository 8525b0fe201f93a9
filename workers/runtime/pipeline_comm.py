"""Point-to-point hand-off of hidden states between pipeline stages.

Sends are non-blocking so a stage can start on the next micro-batch while the next stage is still
busy; a stage receives micro-batches in plan order. Tags carry the plan's id (gloo matches on them;
NCCL ignores them and relies on the order alone, which is the same).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

HIDDEN_TAG = 1 << 16   # hidden-state tags are HIDDEN_TAG + step_id % TAG_CYCLE
TAG_CYCLE = 1 << 12


def hidden_tag(step_id: int) -> int:
    return HIDDEN_TAG + step_id % TAG_CYCLE


def send_hidden(hidden: torch.Tensor, dst: int, step_id: int = 0):
    """Post the send; returns (handle, tensor sent), the tensor to keep alive until the handle completes."""
    buf = hidden.contiguous()
    return dist.isend(buf, dst, tag=hidden_tag(step_id)), buf


def recv_hidden(num_tokens: int, hidden_size: int, dtype: torch.dtype, device, src: int,
                step_id: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Receive into `out` when given (a graph's fixed input), else into a new tensor."""
    buf = torch.empty((num_tokens, hidden_size), dtype=dtype, device=device) if out is None else out
    dist.recv(buf, src, tag=hidden_tag(step_id))
    return buf
