"""Tensor-parallel linears. The only place (with rank_protocol) where model code meets collectives,
through a TP group's `comm` (tp_comm: all_reduce returning the sum, all_gather; None when tp is 1).
`matmul(x, weight)` computes x W^T (kernel_ops: torch's, or a decode-sized Triton kernel)."""
from __future__ import annotations

import torch
from torch import nn


def plain_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows across TP ranks; output stays sharded, no communication."""

    def __init__(self, weight: torch.Tensor, matmul=plain_matmul):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over TP ranks of x_r W_r^T: the input is sharded, one all-reduce makes the output whole."""

    def __init__(self, weight: torch.Tensor, comm, matmul=plain_matmul):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.comm, self.matmul = comm, matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.weight)
        if self.comm is not None:
            y = self.comm.all_reduce(y)
        return y


class VocabParallelLMHead(nn.Module):
    """Each TP rank scores its slice of the (padded) vocabulary; an all-gather joins full logits."""

    def __init__(self, weight: torch.Tensor, comm, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.comm, self.vocab_size = comm, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = (x @ self.weight.t()).float()
        if self.comm is None:
            return local[:, : self.vocab_size].contiguous()
        return torch.cat(self.comm.all_gather(local), dim=-1)[:, : self.vocab_size].contiguous()
