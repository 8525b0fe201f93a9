"""Tensor-parallel linears. The only place (with pipeline_comm) where model code meets collectives."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows across TP ranks; output stays sharded, no communication."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class RowParallelLinear(nn.Module):
    """y = sum over TP ranks of x_r W_r^T: the input is sharded, one all-reduce makes the output whole."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t()
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y


class VocabParallelLMHead(nn.Module):
    """Each TP rank scores its slice of the (padded) vocabulary; an all-gather joins full logits."""

    def __init__(self, weight: torch.Tensor, group, tp: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group, self.tp, self.vocab_size = group, tp, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = (x @ self.weight.t()).float()
        if self.group is None:
            return local[:, : self.vocab_size].contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size].contiguous()
