"""One preallocated paged KV pool per rank: [layers, blocks, block_size, kv_heads, head_dim] for K and V."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        """Copy whole blocks, every layer, K and V: pairs [C, 2] of (source, destination) block ids;
        every source is read before any destination is written."""
        pairs = pairs.to(self.k.device)
        src, dst = pairs[:, 0], pairs[:, 1]
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([tokens, kv_heads, head_dim]) at flat slot indices (block * block_size + offset)."""
        kv_heads, head_dim = k.shape[1:]
        self.k[layer].view(-1, kv_heads, head_dim)[slots] = k
        self.v[layer].view(-1, kv_heads, head_dim)[slots] = v
