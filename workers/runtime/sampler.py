"""Token choice on the last stage: penalties, then greedy or temperature / top-k / top-p / min-p
sampling driven by a per-row seed from the plan, so the same seed gives the same token whatever else
is in the batch; plus the log-probabilities clients ask for."""
from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, output_start: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Repetition penalty over prompt + output ids; presence and frequency penalties over output ids.
    history [B, L] (-1 padded) and the [B] parameters are host tensors; logits [B, V] on device."""
    if history.shape[1] == 0:
        return logits
    dev, (b, vocab) = logits.device, logits.shape
    hist = history.to(dev)
    valid = hist >= 0
    ids = hist.clamp(min=0)
    is_output = torch.arange(hist.shape[1], device=dev)[None, :] >= output_start.to(dev)[:, None]
    counts = torch.zeros(b, vocab, device=dev).scatter_add_(1, ids, (valid & is_output).float())
    seen = torch.zeros(b, vocab, device=dev).scatter_add_(1, ids, valid.float()) > 0
    rep = repetition.to(dev)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency.to(dev)[:, None] * counts - presence.to(dev)[:, None] * (counts > 0).float()


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 on device; parameters are host tensors [B]. Returns int64 [B] on device."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperature.tolist()) if t > 0]
    if not rows:
        return chosen
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    scaled = logits[idx] / temperature[rows].to(dev)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=dev)[None, :]
    k = top_k[rows].to(dev)
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each token
    keep = before < top_p[rows].to(dev)[:, None]
    if min_p is not None:
        keep &= probs >= min_p[rows].to(dev)[:, None] * probs[:, :1]
    keep[:, 0] = True
    probs = probs.masked_fill(~keep, 0.0)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p).
    noise = torch.empty_like(probs)
    for j, row in enumerate(rows):
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seeds[row]) & 0x7FFF_FFFF_FFFF_FFFF)
        noise[j].exponential_(generator=gen)
    picked = (probs / noise).argmax(dim=-1)
    chosen[idx] = order.gather(1, picked[:, None])[:, 0]
    return chosen


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (raw logits, before any sampling setting): a float32 [B, 1 + n]
    tensor (chosen token first, then the top n) and the top n ids, int64 [B, n]."""
    lp = logits.float().log_softmax(dim=-1)
    top_lp, top_ids = lp.topk(n, dim=-1) if n > 0 else (lp[:, :0], chosen[:, None][:, :0])
    return torch.cat([lp.gather(1, chosen[:, None]), top_lp], dim=1), top_ids
