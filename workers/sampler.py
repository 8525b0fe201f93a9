"""Token choice on the last stage: greedy, or temperature / top-k / top-p sampling driven by a
per-row seed from the plan, so the same seed gives the same token whatever else is in the batch."""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 on device; parameters are host tensors [B]. Returns int64 [B] on device."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperature.tolist()) if t > 0]
    if not rows:
        return chosen
    idx = torch.tensor(rows, device=logits.device)
    scaled = logits[idx] / temperature[rows].to(logits.device)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = top_k[rows].to(logits.device)
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each token
    keep = before < top_p[rows].to(logits.device)[:, None]
    keep[:, 0] = True
    probs = probs.masked_fill(~keep, 0.0)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p).
    noise = torch.empty_like(probs)
    for j, row in enumerate(rows):
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(int(seeds[row]) & 0x7FFF_FFFF_FFFF_FFFF)
        noise[j].exponential_(generator=gen)
    picked = (probs / noise).argmax(dim=-1)
    chosen[idx] = order.gather(1, picked[:, None])[:, 0]
    return chosen
