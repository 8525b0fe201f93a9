import torch

from meshserve.workers.runtime.sampler import sample


def params(b, temperature=1.0, top_k=0, top_p=1.0, seed=7):
    return (torch.full((b,), float(temperature)), torch.full((b,), top_k, dtype=torch.int64),
            torch.full((b,), float(top_p)), torch.full((b,), seed, dtype=torch.int64))


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, *params(4, temperature=0)), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, *params(3, top_k=1)), logits.argmax(-1))
    assert torch.equal(sample(logits, *params(3, top_p=1e-6)), logits.argmax(-1))


def test_same_seed_same_token_whatever_the_batch():
    logits = torch.randn(1, 1000)
    alone = sample(logits, *params(1, seed=123))
    batch = torch.cat([torch.randn(2, 1000), logits])
    t, k, p, s = params(3, seed=123)
    s[:2] = torch.tensor([5, 6])
    assert sample(batch, t, k, p, s)[2] == alone[0]


def test_top_k_restricts_choices():
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(5).indices.tolist())
    for seed in range(50):
        assert sample(logits, *params(1, top_k=5, seed=seed)).item() in allowed


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None]
    counts = torch.zeros(3)
    for seed in range(3000):
        counts[sample(logits, *params(1, seed=seed))] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_penalties_follow_their_definitions():
    from meshserve.workers.runtime.sampler import apply_penalties
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    history = torch.tensor([[0, 1, 3, 3, -1]])  # prompt [0, 1], output [3, 3], one pad
    out = apply_penalties(logits, history, torch.tensor([2]), torch.tensor([0.5]), torch.tensor([0.25]),
                          torch.tensor([2.0]))
    expect = torch.tensor([[1.0, -2.0, 0.5, 1.5 - 0.5 - 0.5, 1.0]])  # token 3: 3/2, minus 0.25*2, minus 0.5
    assert torch.allclose(out, expect)


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top_one():
    """min_p=0.5 keeps the tokens at least half as likely as the most likely one (0.40 and 0.21, not
    0.19 nor the tail) and draws among them in proportion; a row with min_p=0 in the same batch keeps
    every token."""
    probs = torch.tensor([0.40, 0.21, 0.19] + [0.01] * 20)
    n = 2000  # rows per setting, one seed each
    logits = probs.log()[None].repeat(2 * n, 1)
    t, k, p, s = params(2 * n)
    s = torch.arange(2 * n)
    min_p = torch.tensor([0.5] * n + [0.0] * n)
    out = sample(logits, t, k, p, s, min_p=min_p)
    kept, free = out[:n], out[n:]
    assert set(kept.tolist()) == {0, 1}
    freq = torch.bincount(kept, minlength=len(probs)).float() / n
    assert torch.allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=0.03), freq[:2]
    freq = torch.bincount(free, minlength=len(probs)).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_logprobs_are_the_model_distribution():
    from meshserve.workers.runtime.sampler import logprobs_of
    logits = torch.randn(2, 30)
    chosen = torch.tensor([4, 7])
    lps, top = logprobs_of(logits, chosen, 3)
    ref = logits.log_softmax(-1)
    assert torch.allclose(lps[:, 0], ref[[0, 1], chosen])
    assert torch.equal(top, ref.topk(3).indices) and torch.allclose(lps[:, 1:], ref.topk(3).values)
