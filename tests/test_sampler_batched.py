"""The batched sampler: a row's token depends only on its logits and seed, draws follow the filtered
softmax distribution, greedy settings give the argmax, and the counter-based noise stays fixed."""
import math

import pytest
import torch

from meshserve.workers.runtime import sampler
from meshserve.workers.runtime.sampler import sample, uniform_noise


def random_seeds(n: int, seed: int) -> torch.Tensor:
    """n 63-bit seeds, like the ones the step plan carries."""
    return torch.randint(0, 2**63 - 1, (n,), generator=torch.Generator().manual_seed(seed))


def random_rows(gen: torch.Generator, b: int, vocab: int):
    """b rows of logits (some with ties, some with -inf entries) and random mixed settings."""
    logits = torch.randn(b, vocab, generator=gen) * 2
    coarse = torch.rand(b, generator=gen) < 0.4
    logits[coarse] = (logits[coarse] * 2).round() / 2  # many ties, at the top too
    holes = (torch.rand(b, vocab, generator=gen) < 0.1) & (torch.rand(b, 1, generator=gen) < 0.3)
    holes[torch.arange(b), logits.argmax(-1)] = False
    logits = logits.masked_fill(holes, float("-inf"))

    def pick(choices, dtype=torch.float32):
        return torch.tensor(choices, dtype=dtype)[torch.randint(len(choices), (b,), generator=gen)]

    temperature = pick([0.0, 0.4, 1.0, 1.8])
    top_k = pick([0, 1, 3, vocab, vocab + 5, -1], torch.int64)
    top_p = pick([1.0, 0.95, 0.6, 1e-6])
    min_p = pick([0.0, 0.02, 0.3])
    seeds = torch.randint(0, 2**63 - 1, (b,), generator=gen)
    return logits, temperature, top_k, top_p, seeds, min_p


def draw(rows):
    logits, temperature, top_k, top_p, seeds, min_p = rows
    return sample(logits, temperature, top_k, top_p, seeds, min_p)


def take(rows, index):
    return tuple(x[index] for x in rows)


def test_a_row_draws_the_same_token_alone_elsewhere_or_among_others():
    gen = torch.Generator().manual_seed(0)
    not_argmax = 0
    for _ in range(30):
        vocab, b = int(torch.randint(1, 300, (), generator=gen)), int(torch.randint(1, 13, (), generator=gen))
        rows = random_rows(gen, b, vocab)
        out = draw(rows)
        assert out.dtype == torch.int64 and out.shape == (b,)
        for i in range(b):
            assert draw(take(rows, slice(i, i + 1))).item() == out[i].item()
        others = random_rows(gen, int(torch.randint(1, 10, (), generator=gen)), vocab)
        perm = torch.randperm(b + len(others[0]), generator=gen)
        mixed = draw(take(tuple(torch.cat([x, y]) for x, y in zip(rows, others)), perm))
        assert torch.equal(mixed[perm.argsort()[:b]], out)
        not_argmax += int((out != rows[0].argmax(-1)).sum())
    assert not_argmax >= 20, not_argmax  # the rows really sample, so the check above is not only about argmax


def filtered_probs(logits: torch.Tensor, t: float, k: int = 0, p: float = 1.0, mp: float = 0.0) -> torch.Tensor:
    """The distribution sample() should draw from, by definition, in float64; it also checks that no
    token sits so close to a top-p or min-p cut that float32 rounding could move it."""
    x = logits.double() / t
    order = x.argsort(descending=True, stable=True)
    kk = k if 0 < k < len(x) else len(x)
    probs = torch.zeros_like(x)
    probs[:kk] = x[order][:kk].softmax(-1)
    before = probs.cumsum(-1) - probs
    assert p >= 1 or ((before - p)[:kk].abs() > 1e-4).all()
    assert mp <= 0 or ((probs - mp * probs[0])[:kk].abs() > 1e-4).all()
    keep = (before < p) & (probs >= mp * probs[0]) & (torch.arange(len(x)) < kk)
    keep[0] = True
    out = torch.zeros_like(x)
    out[order] = probs * keep
    return out / out.sum()


def chi2_bound(df: int) -> float:
    """Upper 3e-7 quantile (z = 5) of chi-square with df degrees of freedom (Wilson-Hilferty). The seeds
    are fixed, so a run never flakes; with this bound a correct sampler fails for fewer than one
    choice of seeds in a million, while a wrong distribution at these counts lands far above it."""
    a = 2 / (9 * df)
    return df * (1 - a + 5 * math.sqrt(a)) ** 3


def check_frequencies(out: torch.Tensor, expect: torch.Tensor):
    n = len(out)
    counts = torch.bincount(out, minlength=len(expect)).double()
    assert counts[expect == 0].sum() == 0, "a filtered-out token was drawn"
    live = expect > 0
    assert live.sum() >= 3 and (n * expect[live]).min() >= 5, "test setup: too few draws per token"
    chi2 = ((counts[live] - n * expect[live]) ** 2 / (n * expect[live])).sum().item()
    assert chi2 < chi2_bound(int(live.sum()) - 1), (chi2, counts, n * expect)


@pytest.mark.parametrize("setting", [dict(t=1.0), dict(t=0.6, k=5), dict(t=1.4, p=0.7), dict(t=1.0, mp=0.12),
                                     dict(t=0.9, k=8, p=0.9, mp=0.05)])
def test_draws_follow_the_filtered_softmax(setting):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(1)) * 1.5
    expect = filtered_probs(logits, **setting)
    n = 20000  # half small consecutive seeds (the hash must mix them), half random 63-bit ones
    seeds = torch.cat([torch.arange(n // 2), random_seeds(n // 2, 2)])
    out = sample(logits[None].repeat(n, 1), torch.full((n,), setting["t"]), torch.full((n,), setting.get("k", 0)),
                 torch.full((n,), setting.get("p", 1.0)), seeds, torch.full((n,), setting.get("mp", 0.0)))
    check_frequencies(out, expect)


def test_equal_logits_draw_every_token_evenly():
    """All tokens tie: the draw is the race of the noise alone, so it must not favour any token id."""
    n, vocab = 10000, 500
    out = sample(torch.zeros(n, vocab), torch.ones(n), torch.zeros(n, dtype=torch.int64), torch.ones(n),
                 torch.arange(n) * 1000003)
    check_frequencies(out, torch.full((vocab,), 1 / vocab, dtype=torch.float64))


def test_a_filter_changes_the_draw_only_when_it_drops_the_drawn_token():
    """The noise is indexed by token id, so with one seed the unfiltered race and a filtered one share
    each token's noise: if the unfiltered winner survives the filter, it wins the filtered race too."""
    n, vocab = 3000, 40
    logits = (torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * 2)[None].repeat(n, 1)
    seeds = random_seeds(n, 8)
    ones, t = torch.ones(n), torch.full((n,), 0.8)
    free = sample(logits, t, torch.zeros(n, dtype=torch.int64), ones, seeds)
    probs = (logits[0] / 0.8).softmax(-1)
    ranked = probs.argsort(descending=True)
    mass_above = probs[ranked].cumsum(0) - probs[ranked]
    for k, p, mp, kept in [(10, 1.0, 0.0, ranked[:10]), (0, 0.8, 0.0, ranked[mass_above < 0.8]),
                           (0, 1.0, 0.1, (probs >= 0.1 * probs.max()).nonzero()[:, 0])]:
        cut = sample(logits, t, torch.full((n,), k), ones * p, seeds, torch.full((n,), mp))
        survives = torch.isin(free, kept)
        assert torch.isin(cut, kept).all() and 0 < survives.sum() < n
        assert torch.equal(cut[survives], free[survives])


def test_top_k_one_and_tiny_or_zero_top_p_are_greedy():
    gen = torch.Generator().manual_seed(3)
    logits, temperature, _, _, seeds, _ = random_rows(gen, 64, 200)
    temperature = temperature + 0.5
    ones, zeros = torch.ones(64), torch.zeros(64)
    argmax = logits.argmax(-1)  # ties go to the lowest id, as with top_k=1
    assert torch.equal(sample(logits, temperature, torch.ones(64, dtype=torch.int64), ones, seeds), argmax)
    for top_p in (1e-6, 0.0):  # top_p=0 keeps nothing but the top token, which is always kept
        assert torch.equal(sample(logits, temperature, torch.zeros(64, dtype=torch.int64), ones * top_p, seeds, zeros),
                           argmax)


@pytest.mark.parametrize("temperature,min_p,kept", [(1.0, 0.5, {0, 1, 2}), (2.0, 0.6, {0, 1, 2, 3})])
def test_min_p_drops_exactly_the_tokens_below_its_threshold(temperature, min_p, kept):
    """probs / max after temperature 1: 1, .83, .53, .47, ...; after temperature 2 (square roots):
    1, .91, .73, .68, .52, ... So min_p=0.5 at t=1 keeps {0, 1, 2} and min_p=0.6 at t=2 keeps
    {0, 1, 2, 3}. Rows with min_p=0 in the same batch draw every token."""
    probs = torch.tensor([0.30, 0.25, 0.16, 0.14, 0.08, 0.05, 0.02])
    n = 4000  # rows per setting, one seed each
    logits = probs.log()[None].repeat(2 * n, 1)
    seeds = random_seeds(2 * n, 9)
    out = sample(logits, torch.full((2 * n,), temperature), torch.zeros(2 * n, dtype=torch.int64),
                 torch.ones(2 * n), seeds, torch.tensor([min_p] * n + [0.0] * n))
    assert set(out[:n].tolist()) == kept
    assert torch.bincount(out[n:], minlength=len(probs)).min() >= 20
    check_frequencies(out[:n], filtered_probs(probs.log(), temperature, mp=min_p))


def reference_uniform(seed: int, token: int) -> float:
    """uniform_noise for one (seed, token), in plain Python integers."""
    def fmix32(x):
        x ^= x >> 16
        x = x * 0x85EBCA6B & 0xFFFF_FFFF
        x ^= x >> 13
        x = x * 0xC2B2AE35 & 0xFFFF_FFFF
        return x ^ (x >> 16)
    seed &= 2**64 - 1
    key = fmix32((seed & 0xFFFF_FFFF) ^ fmix32((seed >> 32) ^ 0x9E3779B9))
    return ((fmix32(fmix32(token ^ 0x7F4A7C15) ^ key) >> 8) | 1) / 2**24


def test_uniform_noise_is_open_unit_and_pinned():
    seeds = torch.cat([torch.tensor([0, 1, -1, 2**63 - 1, 12345]), random_seeds(59, 4)])
    u = uniform_noise(seeds, 4096, "cpu")
    assert u.dtype == torch.float32 and u.shape == (64, 4096)
    assert (u > 0).all() and (u < 1).all()
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.round()) and (scaled.long() % 2 == 1).all()  # (2j + 1) / 2**24
    for i, t in [(0, 0), (2, 17), (3, 4095), (7, 1234), (40, 999)]:
        assert u[i, t].item() == reference_uniform(int(seeds[i]), t)
    # Pinned values: a change to the hash changes every sampled token a seed gives, so it must show here.
    pinned = uniform_noise(torch.tensor([12345, 2**63 - 1]), 100001, "cpu")[:, [0, 1, 100000]] * 2**24
    assert pinned.long().tolist() == [[12042569, 14135621, 13357131], [10599001, 151521, 7199493]]
    # Neither the vocabulary size nor the other rows change a row's values.
    alone = uniform_noise(torch.tensor([12345]), 100001, "cpu")[0, :3]
    assert torch.equal(uniform_noise(torch.tensor([7, 12345]), 3, "cpu")[1], alone)
    # Asking for some token ids alone gives those ids' values.
    ids = torch.randint(4096, (64, 50), generator=torch.Generator().manual_seed(10))
    assert torch.equal(uniform_noise(seeds, 4096, "cpu", tokens=ids), u.gather(1, ids))


def test_greedy_batches_are_argmax_without_noise(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    logits, _, top_k, top_p, seeds, min_p = random_rows(gen, 16, 300)
    mixed = random_rows(gen, 16, 300)
    greedy = mixed[1] == 0
    assert 0 < greedy.sum() < 16
    assert torch.equal(draw(mixed)[greedy], mixed[0].argmax(-1)[greedy])

    def no_noise(*args, **kwargs):
        raise AssertionError("a greedy-only batch must not draw noise")
    monkeypatch.setattr(sampler, "_noise", no_noise)  # every draw's noise goes through it
    monkeypatch.setattr(sampler, "uniform_noise", no_noise)
    assert torch.equal(sample(logits, torch.zeros(16), top_k, top_p, seeds, min_p), logits.argmax(-1))
    assert torch.equal(sample(logits[:1], torch.zeros(1), top_k[:1], top_p[:1], seeds[:1]), logits[:1].argmax(-1))


@pytest.mark.gpu
def test_cuda_draws_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(6)
    seeds = torch.randint(0, 2**63 - 1, (64,), generator=gen)
    assert torch.equal(uniform_noise(seeds, 128256, "cuda").cpu(), uniform_noise(seeds, 128256, "cpu"))
    rows = random_rows(gen, 256, 32000)
    assert torch.equal(draw((rows[0].cuda(),) + rows[1:]).cpu(), draw(rows))
