"""The Llama layers one rank holds: plain PyTorch, read top to bottom.

A stage embeds (first stage), runs its decoder layers, then (last stage) normalizes and scores the
vocabulary at each sequence's last position. Heads and MLP columns are this rank's TP slice. What
sits between the matmuls and collectives (norms, RoPE and the KV write, attention, SiLU) comes from
`ops` (kernel_ops: plain PyTorch or fused Triton kernels). The residual stream travels beside each
layer's output, so the add and the next norm are one operation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.workers.runtime.kv_cache import KVCache
from meshserve.workers.runtime.parallel_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
from meshserve.workers.runtime.step_inputs import StepInputs


class Attention(nn.Module):
    def __init__(self, qkv: torch.Tensor, dense: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int,
                 tp_comm, ops):
        super().__init__()
        self.qkv = ColumnParallelLinear(qkv, ops.matmul)
        self.dense = RowParallelLinear(dense, tp_comm, ops.matmul)
        self.q_heads, self.kv_heads, self.head_dim, self.ops = q_heads, kv_heads, head_dim, ops

    def forward(self, x, step: StepInputs, cos_table, sin_table, cache: KVCache, layer: int) -> torch.Tensor:
        q = self.ops.rope_write_kv(self.qkv(x), cos_table, sin_table, step, cache, layer, self.q_heads,
                                   self.kv_heads, self.head_dim)
        o = self.ops.attend(q, cache.k[layer], cache.v[layer], step)
        return self.dense(o.reshape(-1, self.q_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, tp_comm, ops):
        super().__init__()
        self.gate_up = ColumnParallelLinear(torch.cat([gate, up], 0), ops.matmul)  # fused at load
        self.down = RowParallelLinear(down, tp_comm, ops.matmul)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.ops.gated_matmul(x, self.gate_up.weight))


class DecoderLayer(nn.Module):
    def __init__(self, w: dict, prefix: str, eps: float, q_heads: int, kv_heads: int, head_dim: int, tp_comm,
                 ops):
        super().__init__()
        self.input_norm = nn.Parameter(w[prefix + "input_layernorm.weight"], requires_grad=False)
        self.attention = Attention(w[prefix + "attention.qkv.weight"], w[prefix + "attention.dense.weight"],
                                   q_heads, kv_heads, head_dim, tp_comm, ops)
        self.post_norm = nn.Parameter(w[prefix + "post_layernorm.weight"], requires_grad=False)
        self.mlp = MLP(w[prefix + "mlp.fc.weight"], w[prefix + "mlp.gate.weight"], w[prefix + "mlp.proj.weight"],
                       tp_comm, ops)
        self.eps, self.ops = eps, ops

    def forward(self, out, residual, step, cos_table, sin_table, cache, layer):
        """out: the previous layer's output (or the stage's input, with residual None); returns this
        layer's output and the residual stream before it (their sum is the layer's hidden state)."""
        x, residual = self.ops.add_rms_norm(out, residual, self.input_norm, self.eps)
        a = self.attention(x, step, cos_table, sin_table, cache, layer)
        x, residual = self.ops.add_rms_norm(a, residual, self.post_norm, self.eps)
        return self.mlp(x), residual


class LlamaStage(nn.Module):
    """The layers of one (pp_stage, tp_rank); weights come from that rank's file, TensorRT-LLM names."""

    def __init__(self, spec, weights: dict, num_local_layers: int, q_heads: int, kv_heads: int,
                 tp_comm, first: bool, last: bool, ops):
        super().__init__()
        self.first, self.last, self.ops, self.eps = first, last, ops, spec.rms_norm_eps
        self.embedding = weights.get("transformer.vocab_embedding.weight") if first else None
        self.layers = nn.ModuleList(
            DecoderLayer(weights, f"transformer.layers.{i}.", spec.rms_norm_eps, q_heads, kv_heads,
                         spec.head_dim, tp_comm, ops) for i in range(num_local_layers))
        if last:
            self.norm = nn.Parameter(weights["transformer.ln_f.weight"], requires_grad=False)
            self.lm_head = VocabParallelLMHead(weights["lm_head.weight"], tp_comm, spec.vocab_size)

    def forward(self, h: torch.Tensor | None, step: StepInputs, cos_table, sin_table, cache: KVCache):
        """h: received hidden states, or None on the first stage. Returns hidden states, or logits
        [B, vocab] (float32) of each sequence's last token on the last stage."""
        if self.first:
            h = F.embedding(step.input_ids, self.embedding)
        out, residual = h, None
        for i, layer in enumerate(self.layers):
            out, residual = layer(out, residual, step, cos_table, sin_table, cache, i)
        if not self.last:
            return out if residual is None else out + residual
        rows = step.sample_index
        x, _ = self.ops.add_rms_norm(out[rows], None if residual is None else residual[rows], self.norm, self.eps)
        return self.lm_head(x)
