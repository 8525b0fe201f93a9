"""Token choice on the last stage: penalties, logit bias and grammar masks, then greedy or temperature /
top-k / top-p / min-p sampling, batched on the device. Each sampled row draws with its own seed from
the plan through a counter-based hash of (seed, token id), so the token it gets depends only on its
logits and seed, never on the rest of the batch, its place in it or the device; plus the
log-probabilities clients ask for."""
from __future__ import annotations

import functools

import torch


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on dev without waiting for the device: a copy from pageable memory would first
    wait for all queued work (the whole forward pass), which the scheduling ahead must not."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first index on ties). On GPU, rows are few and wide (a vocabulary): one
    reduction block per row would take tens of microseconds, so chunks of each row reduce in parallel
    first (see fused_kernels.argmax_rows)."""
    if not logits.is_cuda:
        return logits.argmax(dim=-1)
    from meshserve.workers.runtime.fused_kernels import argmax_rows as chunked
    return chunked(logits)


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, output_start: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Repetition penalty over prompt + output ids; presence and frequency penalties over output ids.
    history [B, L] (-1 padded) and the [B] parameters are host tensors; logits [B, V] on device."""
    if history.shape[1] == 0:
        return logits
    dev, (b, vocab) = logits.device, logits.shape
    hist = to_device(history, dev)
    valid = hist >= 0
    ids = hist.clamp(min=0)
    is_output = torch.arange(hist.shape[1], device=dev)[None, :] >= to_device(output_start, dev)[:, None]
    counts = torch.zeros(b, vocab, device=dev).scatter_add_(1, ids, (valid & is_output).float())
    seen = torch.zeros(b, vocab, device=dev).scatter_add_(1, ids, valid.float()) > 0
    rep = to_device(repetition, dev)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - to_device(frequency, dev)[:, None] * counts - to_device(presence, dev)[:, None] * (counts > 0).float()


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add each (row, token id, bias) entry (host tensors [K]) to the logits [B, V] on device; a new
    tensor when there is any entry (the raw logits stay for the log-probabilities)."""
    if rows.numel() == 0:
        return logits
    dev = logits.device
    return logits.index_put((to_device(rows, dev), to_device(ids, dev)), to_device(values, dev).to(logits.dtype),
                            accumulate=True)


_BITS: dict = {}  # device -> arange(32) int32, the bit positions of a mask word


def apply_token_mask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens a grammar forbids. rows: host int64 [G], the rows that have a mask;
    words: host int64 [G, W], each the little-endian pair of int32 words of 32 token bits (token t:
    bit t % 32 of int32 word t // 32). Bits past the logits' width are ignored; tokens past the
    mask's are forbidden. A new tensor when any row has a mask."""
    if rows.numel() == 0:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    if dev not in _BITS:
        _BITS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    packed = to_device(words.contiguous().view(torch.int32), dev)              # [G, 2W]
    allowed = (packed[:, :, None].bitwise_right_shift(_BITS[dev]) & 1).flatten(1)[:, :vocab].bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    idx = to_device(rows, dev)
    out = logits.clone()
    out[idx] = logits.index_select(0, idx).masked_fill_(~allowed, float("-inf"))
    return out


_M32 = 0xFFFF_FFFF


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche), in place on int64 x holding
    values in [0, 2**32); tmp is scratch of x's shape. shifted: x already holds its first step,
    x ^ (x >> 16). Each constant c >= 2**31 multiplies as c - 2**32, the same modulo 2**32, so that
    |x * (c - 2**32)| < 2**63 never overflows int64."""
    if not shifted:
        x ^= torch.bitwise_right_shift(x, 16, out=tmp)
    for c, shift in ((0x85EBCA6B, 13), (0xC2B2AE35, 16)):
        x.mul_(c - 2**32).bitwise_and_(_M32)
        x ^= torch.bitwise_right_shift(x, shift, out=tmp)
    return x


def _row_keys(seeds: torch.Tensor) -> torch.Tensor:
    """int64 seeds [B] (all 64 bits count) -> one 32-bit key per row, on the seeds' device, with the
    last round's first step (x ^ (x >> 16), linear in xor) taken already."""
    hi = ((seeds >> 32) & _M32) ^ 0x9E3779B9
    key = (seeds & _M32) ^ _fmix32_(hi, torch.empty_like(hi))
    key = _fmix32_(key, torch.empty_like(key))
    return key ^ (key >> 16)


def _token_keys(tokens: torch.Tensor) -> torch.Tensor:
    """int64 token ids -> their 32-bit hashes, with the last round's first step taken already."""
    x = tokens ^ 0x7F4A7C15
    x = _fmix32_(x, torch.empty_like(x))
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=8)
def _vocab_keys(vocab: int, device: torch.device) -> torch.Tensor:
    return _token_keys(torch.arange(vocab, device=device)[None, :])


def _noise(row_keys: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    """The last round over row key ^ token key ([B] and [1 or B, n], on one device), as uniforms."""
    h = token_keys ^ row_keys[:, None]
    h = _fmix32_(h, torch.empty_like(h), shifted=True)
    # (h >> 8) | 1 = 2j + 1 < 2**24 with j = h >> 9: exact in float32, as is the power-of-two scaling.
    return h.bitwise_right_shift_(8).bitwise_or_(1).to(torch.float32).mul_(2.0 ** -24)


def uniform_noise(seeds: torch.Tensor, vocab: int, device, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms in (0, 1), float32 [B, vocab] on device: entry (b, t) hashes (seeds[b], token t) alone,
    with integer ops only (rounds of MurmurHash3's 32-bit finalizer), so it is the same bit for bit
    whatever the batch, the row's place in it or the device. seeds: int64 [B] (all 64 bits count), hashed
    where they are; tokens: int64 [B, n] ids on device to take instead of every id below vocab (the
    result is then [B, n]). Each value is (2j + 1) / 2**24 for a hashed 23-bit j."""
    row_keys = to_device(_row_keys(seeds.long()), torch.device(device))
    token_keys = _vocab_keys(vocab, torch.device(device)) if tokens is None else _token_keys(tokens)
    return _noise(row_keys, token_keys)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 on device; parameters are host tensors [B]. Returns int64 [B] on device.

    Rows with temperature 0 take the argmax. The others scale by 1 / temperature, keep the top_k
    tokens (0: all), then those whose probability mass ranked strictly above is < top_p, then those at
    least min_p times as likely as the top one (the top token is always kept), and draw by the
    exponential race: argmax p_i / E_i with E_i = -log(U_i), U_i = uniform_noise(seed, token i), which
    picks token i with probability p_i / sum(p). Only rows with a cut are sorted (stably, so ties at a
    cut go to the lower token id, as in the argmax)."""
    sampled = temperature > 0
    if not bool(sampled.any()):
        return argmax_rows(logits)
    dev, (b, vocab) = logits.device, logits.shape
    min_p = torch.zeros(b) if min_p is None else min_p
    k_eff = torch.where((top_k > 0) & (top_k < vocab), top_k.long(), vocab)
    cut = sampled & ((k_eff < vocab) | (top_p < 1) | (min_p > 0))
    rows = torch.cat([cut.nonzero()[:, 0], (sampled & ~cut).nonzero()[:, 0]])  # rows with a cut first
    n, m = len(rows), int(cut.sum())
    # Row keys are hashed on the host, where the seeds are; they go over with the other int64 values.
    idx, k, row_keys = to_device(torch.stack([rows, k_eff[rows], _row_keys(seeds[rows].long())]), dev)
    temp, p, mp = to_device(torch.stack([x[rows].float() for x in (temperature, top_p, min_p)]), dev)[:, :, None]
    in_order = n == b and m in (0, b)  # every row sampled, and rows kept their order
    scaled = (logits if in_order else logits.index_select(0, idx)) / temp
    # log p_i - log E_i differs from log(p_i / E_i) by the row's log-sum-exp only: the same argmax.
    picked = torch.empty(n, dtype=torch.int64, device=dev)
    if m < n:
        log_e = _noise(row_keys[m:], _vocab_keys(vocab, dev)).log_().neg_().log_()
        picked[m:] = torch.sub(scaled[m:], log_e, out=log_e).argmax(dim=-1)
    if m:
        # Every kept token ranks within the largest top_k of these rows (all of the vocabulary if one
        # has none): only those get noise, the same a token would get in a draw over the whole row.
        width = int(k_eff[rows[:m]].max())
        ranked, order = scaled[:m].sort(dim=-1, descending=True, stable=True)
        ranked, order = ranked[:, :width], order[:, :width]
        keep = torch.arange(width, device=dev)[None, :] < k[:m, None]
        probs = ranked.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each token
        keep &= before < p[:m]
        keep &= probs >= mp[:m] * probs[:, :1]
        keep[:, 0] = True
        log_e = _noise(row_keys[:m], _token_keys(order)).log_().neg_().log_()
        scores = torch.sub(ranked, log_e, out=log_e).masked_fill_(~keep, float("-inf"))
        picked[:m] = order.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]
    if in_order:
        return picked
    chosen = argmax_rows(logits) if n < b else torch.empty(b, dtype=torch.int64, device=dev)
    return chosen.index_copy_(0, idx, picked)


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (raw logits, before any sampling setting): a float32 [B, 1 + n]
    tensor (chosen token first, then the top n) and the top n ids, int64 [B, n]."""
    lp = logits.float().log_softmax(dim=-1)
    top_lp, top_ids = lp.topk(n, dim=-1) if n > 0 else (lp[:, :0], chosen[:, None][:, :0])
    return torch.cat([lp.gather(1, chosen[:, None]), top_lp], dim=1), top_ids
