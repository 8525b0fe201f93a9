"""The Llama layers one rank holds: plain PyTorch, read top to bottom.

A stage embeds (first stage), runs its decoder layers, then (last stage) normalizes and scores the
vocabulary at each sequence's last position. Heads and MLP columns are this rank's TP slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.workers.runtime.kv_cache import KVCache
from meshserve.workers.runtime.parallel_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
from meshserve.workers.runtime.rope import apply_rope
from meshserve.workers.runtime.step_inputs import StepInputs


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, qkv: torch.Tensor, dense: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int,
                 tp_group, attend):
        super().__init__()
        self.attend = attend  # f(q, k_pool, v_pool, step), see attention_backend
        self.qkv = ColumnParallelLinear(qkv)
        self.dense = RowParallelLinear(dense, tp_group)
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim

    def forward(self, x, step: StepInputs, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        q_size, kv_size = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(-1, self.q_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(-1, self.kv_heads, self.head_dim), cos, sin)
        cache.write(layer, step.slot_mapping, k, v.view(-1, self.kv_heads, self.head_dim))
        o = self.attend(q, cache.k[layer], cache.v[layer], step)
        return self.dense(o.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, tp_group):
        super().__init__()
        self.gate_up = ColumnParallelLinear(torch.cat([gate, up], 0))  # fused at load
        self.down = RowParallelLinear(down, tp_group)
        self.inter = gate.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, w: dict, prefix: str, eps: float, q_heads: int, kv_heads: int, head_dim: int, tp_group,
                 attend):
        super().__init__()
        self.input_norm = RMSNorm(w[prefix + "input_layernorm.weight"], eps)
        self.attention = Attention(w[prefix + "attention.qkv.weight"], w[prefix + "attention.dense.weight"],
                                   q_heads, kv_heads, head_dim, tp_group, attend)
        self.post_norm = RMSNorm(w[prefix + "post_layernorm.weight"], eps)
        self.mlp = MLP(w[prefix + "mlp.fc.weight"], w[prefix + "mlp.gate.weight"], w[prefix + "mlp.proj.weight"],
                       tp_group)

    def forward(self, h, step, cos, sin, cache, layer):
        h = h + self.attention(self.input_norm(h), step, cos, sin, cache, layer)
        return h + self.mlp(self.post_norm(h))


class LlamaStage(nn.Module):
    """The layers of one (pp_stage, tp_rank); weights come from that rank's file, TensorRT-LLM names."""

    def __init__(self, spec, weights: dict, num_local_layers: int, q_heads: int, kv_heads: int, tp: int,
                 tp_group, first: bool, last: bool, attend):
        super().__init__()
        self.first, self.last = first, last
        self.embedding = weights.get("transformer.vocab_embedding.weight") if first else None
        self.layers = nn.ModuleList(
            DecoderLayer(weights, f"transformer.layers.{i}.", spec.rms_norm_eps, q_heads, kv_heads,
                         spec.head_dim, tp_group, attend) for i in range(num_local_layers))
        if last:
            self.norm = RMSNorm(weights["transformer.ln_f.weight"], spec.rms_norm_eps)
            self.lm_head = VocabParallelLMHead(weights["lm_head.weight"], tp_group, tp, spec.vocab_size)

    def forward(self, h: torch.Tensor | None, step: StepInputs, cos_table, sin_table, cache: KVCache):
        """h: received hidden states, or None on the first stage. Returns hidden states, or logits
        [B, vocab] (float32) of each sequence's last token on the last stage."""
        if self.first:
            h = F.embedding(step.input_ids, self.embedding)
        cos, sin = cos_table[step.positions], sin_table[step.positions]
        for i, layer in enumerate(self.layers):
            h = layer(h, step, cos, sin, cache, i)
        if not self.last:
            return h
        return self.lm_head(self.norm(h[step.sample_index]))
