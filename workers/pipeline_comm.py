"""Point-to-point hand-off of hidden states between pipeline stages."""
from __future__ import annotations

import torch
import torch.distributed as dist


def send_hidden(hidden: torch.Tensor, dst: int) -> None:
    dist.send(hidden.contiguous(), dst)


def recv_hidden(num_tokens: int, hidden_size: int, dtype: torch.dtype, device, src: int) -> torch.Tensor:
    buf = torch.empty((num_tokens, hidden_size), dtype=dtype, device=device)
    dist.recv(buf, src)
    return buf
