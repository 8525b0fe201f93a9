"""Scheduler properties over random workloads, checked against a simulated model and KV cache.

The fake model's next token is a function of the whole token prefix, and the fake KV cache stores,
at each slot, the position and the full prefix that produced it: a step that reads a slot holding
anything but its own prefix (stale, overwritten or wrongly shared K/V) fails at once, and a
request's output matches its solo run only if preemption, recompute and prefix hits are exact.
"""
import random
from collections import Counter, deque

import pytest

from meshserve.orchestrator.block_manager import BlockManager
from meshserve.orchestrator.sampling_params import SamplingParams
from meshserve.orchestrator.scheduler import Scheduler
from meshserve.orchestrator.sequence import Sequence

VOCAB = 11
EOS = 0


def model(prefix: tuple[int, ...], seed: int | None = None) -> int:
    """The next token after prefix; a seed (the choices of one request) draws another one."""
    return hash(prefix if seed is None else (seed, prefix)) % VOCAB  # int tuples hash the same in every process


def solo_output(prompt: list[int], max_tokens: int, max_seq_len: int, seed: int | None = None) -> list[int]:
    ids, out = list(prompt), []
    while True:
        out.append(model(tuple(ids), seed))
        ids.append(out[-1])
        if out[-1] == EOS or len(out) >= max_tokens or len(ids) >= max_seq_len:
            return out


def finish_reason(seq: Sequence, max_seq_len: int) -> str | None:
    if seq.output_ids[-1] == EOS:
        return "stop"
    if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= max_seq_len:
        return "length"
    return None


def check_state(sched: Scheduler, one_in_flight: bool = True) -> None:
    """Reference counts equal the running tables' references; waiting sequences hold nothing;
    running + waiting is in arrival order (with several steps in flight: each of them is)."""
    blocks = sched.blocks
    refs: dict[int, int] = {}
    for seq in sched.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            assert 0 < b < blocks.num_blocks
            refs[b] = refs.get(b, 0) + 1
    for b in range(1, blocks.num_blocks):
        assert blocks.ref_count(b) == refs.get(b, 0), f"block {b}"
    assert blocks.ref_count(0) == 0
    assert blocks.num_used == len(refs) and blocks.num_free == blocks.num_blocks - 1 - len(refs)
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed == 0 and not seq.finished
    for part in ([(*sched.running, *sched.waiting)] if one_in_flight else [sched.running, sched.waiting]):
        order = [s.arrival for s in part]
        assert order == sorted(order) and len(set(order)) == len(order)
    assert not any(s.in_flight for s in sched.waiting)
    assert len(sched.running) <= sched.max_batch_size


def simulate(requests, *, num_blocks, block_size, max_batch_size, max_num_tokens, max_seq_len,
             caching=True, aborts=(), block_manager=BlockManager, depth=1, stats=None, run_ahead=None,
             min_micro_batch=1, scored=(), max_prompt_rows=None, seeds=None):
    """requests: (arrival step, prompt, max_tokens); aborts: (step, request id); depth: steps kept in
    flight, as under pipeline parallelism: a step's K/V writes happen when it is scheduled (every
    stage runs steps in order) and its sampled ids reach `advance` only when it is the oldest.
    run_ahead: schedule ahead with this predicate (two steps in flight, one stage): a row fed the
    token its step in flight samples writes the K/V of the prefix with that token; with
    min_micro_batch, from twice that many live sequences on the steps split them instead.
    Drives the scheduler like the engine does, checking every step; returns (scheduler, seqs) and
    counts steps launched while another was in flight into stats["overlapped"], rows fed an unseen
    token into stats["ahead"]. scored: the ids of requests that ask for prompt logprobs: each step's
    rows (all computed in it) stay within max_prompt_rows, and every position gets exactly one row.
    seeds: {request id: seed} (the choices of one request: same prompt, each its own draws)."""
    seeds = seeds or {}
    blocks = block_manager(num_blocks, block_size)
    if run_ahead is not None:
        depth = 2
    sched = Scheduler(blocks, max_batch_size, max_num_tokens, max_seq_len, enable_prefix_caching=caching,
                      num_micro_batches=2 if min_micro_batch > 1 else 1 if run_ahead else depth,
                      min_micro_batch_size=min_micro_batch, run_ahead=run_ahead, max_prompt_rows=max_prompt_rows)
    seqs = [Sequence(i, list(p), SamplingParams(max_tokens=m, prompt_logprobs=0 if i in scored else None,
                                                seed=seeds.get(i)))
            for i, (_, p, m) in enumerate(requests)]
    row_counts: dict[tuple[int, int], int] = {}
    arrivals = sorted(range(len(requests)), key=lambda i: requests[i][0])
    kv: dict[int, tuple[int, tuple[int, ...]]] = {}  # slot -> (position, prefix its K/V came from)
    in_flight = deque()  # (batch, sampled, sequences that caught up), oldest first
    step = 0
    while arrivals or sched.has_work() or in_flight:
        while arrivals and requests[arrivals[0]][0] <= step:
            sched.add(seqs[arrivals.pop(0)])
        for when, rid in aborts:
            if when == step and not seqs[rid].finished and seqs[rid].arrival >= 0:
                assert sched.abort(rid) and seqs[rid].finish_reason == "abort"
                assert not sched.abort(rid)
        check_state(sched, depth == 1)
        step += 1
        assert step < 5000, "no progress"
        while len(in_flight) < depth and sched.has_work():
            waiting_before = list(sched.waiting)
            flying = [s for b, _, _ in in_flight for s in b.seqs if not s.finished]
            batch = sched.schedule()
            check_state(sched, depth == 1)
            assert all(s in sched.running and s.in_flight for s in flying), "an in-flight sequence was preempted"
            if not batch.seqs:
                assert in_flight, "empty step while requests wait"
                break
            if run_ahead is None:
                assert not any(s in flying for s in batch.seqs), "a sequence is in two steps in flight"
            assert all(s.in_flight <= depth for s in batch.seqs)
            if depth == 1:
                rows = [s for s, n in zip(batch.seqs, batch.num_new) if n]
                live = [s for s in sched.running if s.leader is None and not any(s is f and n == 0 for f, n in
                                                                                  zip(batch.seqs, batch.num_new))]
                assert rows == live[:len(rows)], "running order or FCFS broken"
            admitted = [s for s in waiting_before if any(s is r for r in sched.running)]
            assert admitted == waiting_before[:len(admitted)], "a waiting request was overtaken"
            assert sum(batch.num_new) <= max_num_tokens and len(batch.seqs) <= max_batch_size
            batch.prompt_rows = [(seq, p) for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new)
                                 for p in seq.prompt_rows(start, n)]
            assert len(batch.prompt_rows) <= sched.max_prompt_rows
            written = set()
            sampled = []
            caught_up = []
            check_forks(sched, batch)
            for src, dst in batch.copies:  # before the step's writes, as every rank does
                for o in range(block_size):
                    kv[dst * block_size + o] = kv.get(src * block_size + o)
            forked = {id(s) for s, n in zip(batch.seqs, batch.num_new) if n == 0}
            if stats is not None:
                stats["copies"] = stats.get("copies", 0) + len(batch.copies)
                stats["forks"] = stats.get("forks", 0) + len(forked)
            for seq, n, start in zip(batch.seqs, batch.num_new, batch.starts, strict=True):
                ids = seq.all_ids
                unseen = [tok for b, toks, caught in in_flight for s, tok in zip(b.seqs, toks)
                          if s is seq and any(s is c for c in caught)]
                if seq.in_flight == 1:
                    assert start == seq.num_computed and not unseen
                else:  # scheduled ahead: after what its step in flight computes (and samples)
                    ids = ids + unseen
                    if start == seq.num_tokens:
                        assert unseen and n == 1
                        # never a row for a sequence the token in flight finishes by length
                        assert len(seq.output_ids) + 1 < seq.params.max_tokens and len(ids) < max_seq_len
                        if stats is not None:
                            stats["ahead"] = stats.get("ahead", 0) + 1
                end = start + n
                assert (n >= 1 or id(seq) in forked) and end <= len(ids)
                assert len(seq.block_table) >= blocks.blocks_for(end)
                if end == len(ids):
                    caught_up.append(seq)
                slot = lambda p: seq.block_table[p // block_size] * block_size + p % block_size  # noqa: E731
                for p in range(start):
                    assert kv.get(slot(p)) == (p, tuple(ids[:p + 1])), f"request {seq.request_id} reads bad K/V"
                for p in range(start, end):
                    s = slot(p)
                    assert s not in written, "two writes to one slot in a step"
                    # only the sequences forking off this prompt chunk hold the block too: they read it later
                    forks = sum(s // block_size in f.block_table for f in batch.seqs if id(f) in forked)
                    assert blocks.ref_count(s // block_size) == 1 + forks, "write into a shared block"
                    written.add(s)
                    kv[s] = (p, tuple(ids[:p + 1]))
                sampled.append(model(kv[slot(end - 1)][1], seq.params.seed))
            in_flight.append((batch, sampled, caught_up))
            if stats is not None and len(in_flight) > 1:
                stats["overlapped"] = stats.get("overlapped", 0) + 1
        if not in_flight:
            continue
        batch, sampled, caught_up = in_flight.popleft()
        for seq, p in batch.prompt_rows:
            if not seq.finished:
                seq.take_prompt_row(p, -1.0, [])
                row_counts[seq.request_id, p] = row_counts.get((seq.request_id, p), 0) + 1
        done = sched.advance(batch, sampled)
        assert done == [s for s in caught_up if not s.finished]
        assert all(s.in_flight == sum(any(s is t for t in b.seqs) for b, _, _ in in_flight) for s in batch.seqs)
        for seq in batch.seqs:
            if caching and not seq.finished:
                assert len(seq.block_cids) == seq.num_computed // block_size
        for seq in done:
            reason = finish_reason(seq, max_seq_len)
            if reason:
                sched.finish(seq, reason)
                assert seq.block_table == [] and seq not in sched.running
    assert blocks.num_used == 0 and blocks.num_free == num_blocks - 1
    if isinstance(blocks, CountingBlocks):
        assert blocks.taken == blocks.dropped, "a block reference was not dropped exactly once"
    assert all(s.finished for s in seqs)
    for seq, (_, prompt, max_tokens) in zip(seqs, requests):
        want = solo_output(prompt, max_tokens, max_seq_len, seq.params.seed)
        if seq.finish_reason == "abort":
            assert seq.output_ids == want[:len(seq.output_ids)]
        else:
            assert seq.output_ids == want, f"request {seq.request_id}"
            if seq.request_id in scored:
                assert seq.prompt_rows_done == len(prompt) - 1 and seq.prompt_logprobs[0] is None
                counts = [row_counts.get((seq.request_id, p)) for p in range(len(prompt) - 1)]
                assert counts == [1] * (len(prompt) - 1), f"request {seq.request_id}: rows {counts}"
    return sched, seqs


def check_forks(sched: Scheduler, batch) -> None:
    """A fork row (no new token) comes right after its leader's last prompt chunk or a sibling's
    fork row, holds every block of the leader's table, and has no output yet; followers still
    waiting to fork hold nothing and follow a running leader without output."""
    for i, (seq, n, start) in enumerate(zip(batch.seqs, batch.num_new, batch.starts)):
        if n:
            continue
        assert i > 0 and start == len(seq.prompt_ids) and not seq.output_ids and seq.leader is None
        j = i - 1
        while batch.num_new[j] == 0:
            j -= 1
        lead = batch.seqs[j]
        assert lead.prompt_ids == seq.prompt_ids and batch.starts[j] + batch.num_new[j] == start
        assert seq.block_table == lead.block_table[:len(seq.block_table)]
        assert len(seq.block_table) == sched.blocks.blocks_for(start)
    for seq in sched.running:
        if seq.leader is not None:
            assert seq.block_table == [] and seq.num_computed == 0 and not seq.in_flight
            lead = seq.leader
            assert lead in sched.running and not lead.output_ids and lead.arrival < seq.arrival
            assert any(f is seq for f in lead.followers) and lead.prompt_ids == seq.prompt_ids
    for seq in sched.waiting:
        assert seq.leader is None and not seq.followers


class CountingBlocks(BlockManager):
    """Counts the references taken and dropped of each block: each is dropped exactly once."""

    def __init__(self, num_blocks, block_size):
        super().__init__(num_blocks, block_size)
        self.taken, self.dropped = Counter(), Counter()

    def allocate(self, n):
        out = super().allocate(n)
        self.taken.update(out)
        return out

    def acquire(self, blocks):
        super().acquire(blocks)
        self.taken.update(blocks)

    def free(self, blocks):
        super().free(blocks)
        self.dropped.update(blocks)


def random_workload(rng: random.Random):
    bs = rng.choice([1, 2, 3, 4])
    max_seq_len = rng.randint(8, 40)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 3 * bs + 2))] for _ in range(3)]
    requests = []
    for _ in range(rng.randint(1, 16)):
        prompt = rng.choice(stems) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
        prompt = (prompt or [1])[:max_seq_len - 1]
        max_tokens = rng.randint(1, max_seq_len - len(prompt))
        requests.append((rng.randint(0, 20), prompt, max_tokens))
    need = max(-(-min(len(p) + m, max_seq_len) // bs) for _, p, m in requests)
    aborts = [(rng.randint(0, 40), rng.randrange(len(requests))) for _ in range(rng.randint(0, 2))]
    return requests, dict(num_blocks=1 + need + rng.randint(0, need), block_size=bs,
                          max_batch_size=rng.randint(1, 6), max_num_tokens=rng.randint(1, 24),
                          max_seq_len=max_seq_len, caching=rng.random() < 0.75, aborts=aborts)


def test_random_workloads_are_exact_and_never_leak():
    rng = random.Random(1234)
    preemptions = hits = 0
    for _ in range(500):
        requests, cfg = random_workload(rng)
        sched, _ = simulate(requests, **cfg)
        preemptions += sched.num_preemptions
        hits += sched.hit_tokens
        assert sched.hit_tokens <= sched.queried_tokens
        if not cfg["caching"]:
            assert sched.queried_tokens == 0
    assert preemptions > 300 and hits > 1000  # the workloads do exercise both paths


@pytest.mark.parametrize("mode", ["one step", "pp=2", "ahead"])
def test_random_workloads_with_prompt_logprobs_score_every_position_once(mode):
    """Requests that ask for prompt logprobs among others: they take no cached block before their
    first missing row (but do once their rows are in, after a preemption), each step scores at
    most max_prompt_rows rows, and every prompt position is scored exactly once."""
    rng = random.Random({"one step": 5, "pp=2": 6, "ahead": 7}[mode])
    extra = {"one step": {}, "pp=2": {"depth": 2}, "ahead": {"run_ahead": lambda s: True}}[mode]
    preemptions = capped = 0
    for _ in range(300):
        requests, cfg = random_workload(rng)
        scored = {i for i in range(len(requests)) if rng.random() < 0.5}
        cap = rng.randint(1, 6)
        sched, seqs = simulate(requests, **cfg, **extra, scored=scored, max_prompt_rows=cap)
        preemptions += sum(seqs[i].num_preemptions for i in scored)
        capped += sum(len(p) - 1 > cap for i, (_, p, _) in enumerate(requests) if i in scored)
    assert preemptions > 50 and capped > 200, (preemptions, capped)


@pytest.mark.parametrize("depth", [2, 3])
def test_random_workloads_with_steps_in_flight_are_exact_and_never_leak(depth):
    """Pipeline micro-batches: up to `depth` steps in flight over disjoint sequences."""
    rng = random.Random(99 + depth)
    preemptions = hits = 0
    stats = {}
    for _ in range(400):
        requests, cfg = random_workload(rng)
        sched, _ = simulate(requests, **cfg, depth=depth, stats=stats)
        preemptions += sched.num_preemptions
        hits += sched.hit_tokens
    assert preemptions > 200 and hits > 3000 and stats["overlapped"] > 5000


@pytest.mark.parametrize("feeds, min_micro_batch", [("all", 1), ("some", 1), ("all", 2)])
def test_random_workloads_scheduled_ahead_are_exact_and_never_leak(feeds, min_micro_batch):
    """Scheduling ahead: every row reads the K/V of its own prefix, including the tokens not yet
    seen when it was scheduled; with `some` a third of the requests may not be fed unseen tokens and
    hold the schedule back; with a minimum micro-batch of 2, from 4 live sequences on the steps
    split them instead, so the workloads move between both ways."""
    rng = random.Random(7 + min_micro_batch if feeds == "all" else 8)
    stats = {}
    run_ahead = (lambda s: True) if feeds == "all" else (lambda s: s.request_id % 3 != 0)
    preemptions = 0
    for _ in range(400):
        requests, cfg = random_workload(rng)
        sched, _ = simulate(requests, **cfg, stats=stats, run_ahead=run_ahead, min_micro_batch=min_micro_batch)
        preemptions += sched.num_preemptions
    assert preemptions > 100 and stats["overlapped"] > 3000 and stats["ahead"] > 1000, (preemptions, stats)


def test_in_flight_sequences_are_skipped_and_steps_are_balanced():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(blocks, max_batch_size=8, max_num_tokens=64, max_seq_len=64, num_micro_batches=2)
    seqs = [new_seq(i, [1 + i, 2, 3], max_tokens=5) for i in range(5)]
    for s in seqs:
        sched.add(s)
    first, second = sched.schedule(), sched.schedule()
    # ceil(15 / 2) tokens at most each: the third prompt is chunked, the second step takes the rest
    assert first.seqs == seqs[:3] and first.num_new == [3, 3, 2]
    assert second.seqs == seqs[3:] and second.num_new == [3, 3]
    assert sched.schedule().seqs == []  # everything is in flight
    sched.advance(first, [7] * 3)
    third = sched.schedule()
    assert third.seqs == seqs[:3] and third.num_new == [1, 1, 1]
    assert all(s.in_flight for s in seqs)
    sched.advance(second, [7] * 2)
    sched.advance(third, [7] * 3)
    assert not any(s.in_flight for s in seqs) and [len(s.output_ids) for s in seqs] == [2, 2, 1, 1, 1]
    assert sched.in_flight_tokens == 0


def test_micro_batches_are_balanced_by_tokens_not_sequences():
    """Long prompts among short ones are chunked to share the tokens out over the micro-batches (26
    and 20 of 52; a sequence is in one step at a time), where splitting by sequence count gives 4
    sequences each: 8 and 44 tokens."""
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(blocks, max_batch_size=8, max_num_tokens=64, max_seq_len=64, num_micro_batches=2)
    for i in range(6):
        sched.add(new_seq(i, [1 + i, 2], max_tokens=5))
    for i in (6, 7):
        sched.add(new_seq(i, list(range(i, i + 20)), max_tokens=5))
    first, second = sched.schedule(), sched.schedule()
    assert first.num_new == [2] * 6 + [14] and second.num_new == [20]
    assert sched.in_flight_tokens == 46


def test_small_batches_stay_whole_with_a_minimum_micro_batch():
    """Two steps in flight only split the live sequences once each step gets the minimum."""
    for live, want in ((3, [3, 0]), (4, [4, 0]), (6, [6, 0]), (7, [7, 0]), (8, [4, 4])):
        blocks = BlockManager(num_blocks=64, block_size=4)
        sched = Scheduler(blocks, max_batch_size=8, max_num_tokens=64, max_seq_len=64, num_micro_batches=2,
                          min_micro_batch_size=4)
        for i in range(live):
            sched.add(new_seq(i, [1 + i, 2, 3], max_tokens=5))
        assert [len(sched.schedule().seqs) for _ in range(2)] == want, live


def test_sequences_a_budget_split_off_rejoin_the_batch_below_the_minimum():
    """Prompts the token budget splits over two steps must not stay two micro-batches (each step
    reading every weight) when there are fewer live sequences than two minimum micro-batches."""
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(blocks, max_batch_size=8, max_num_tokens=12, max_seq_len=64, num_micro_batches=2,
                      min_micro_batch_size=4)
    seqs = [new_seq(i, [1 + i, 2, 3, 4], max_tokens=6) for i in range(6)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert first.seqs == seqs[:3] and sched.schedule().seqs == []  # the rest wait for the step in flight
    sched.advance(first, [7] * 3)
    for _ in range(4):
        batch = sched.schedule()
        assert sched.schedule().seqs == []
        sched.advance(batch, [7] * len(batch.seqs))
    assert len(batch.seqs) == 6 and all(len(s.output_ids) >= 1 for s in seqs)


def test_an_in_flight_sequence_is_never_preempted():
    blocks = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    sched = Scheduler(blocks, max_batch_size=2, max_num_tokens=64, max_seq_len=64, num_micro_batches=2)
    a, b = new_seq(0, [1, 2, 3, 4], max_tokens=3), new_seq(1, [5, 6, 7, 8], max_tokens=3)
    sched.add(a)
    sched.add(b)
    first, second = sched.schedule(), sched.schedule()
    assert first.seqs == [a] and second.seqs == [b] and blocks.num_free == 0
    sched.advance(first, [7])
    # a needs a third block; b, the latest arrival, holds the others but is in flight: a waits
    assert sched.schedule().seqs == [] and sched.num_preemptions == 0 and b.block_table
    sched.advance(second, [7])
    assert sched.schedule().seqs == [a] and sched.num_preemptions == 1 and list(sched.waiting) == [b]


class LeakyBlocks(BlockManager):
    def free(self, blocks):
        super().free(blocks[:-1])  # forgets the tail block


class ParentBlindBlocks(BlockManager):
    """A broken prefix cache that keys a block by its tokens alone."""
    def register(self, block, parent_cid, tokens):
        return super().register(block, 0, tokens)

    def match(self, token_ids, max_blocks):
        blocks, cids = [], []
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            b = self._cache.get((0, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])))
            if b is None:
                break
            blocks.append(b)
            cids.append(0)
        return blocks, cids


@pytest.mark.parametrize("broken", [LeakyBlocks, ParentBlindBlocks])
def test_checks_catch_a_broken_block_manager(broken):
    requests = [(0, [1, 2, 3, 4], 3), (5, [3, 4, 1, 2], 3), (6, [5, 5, 5], 4)]
    cfg = dict(num_blocks=12, block_size=2, max_batch_size=4, max_num_tokens=16, max_seq_len=16)
    simulate(requests, **cfg)
    with pytest.raises(AssertionError):
        simulate(requests, **cfg, block_manager=broken)


def drive(sched: Scheduler, token: int = 7):
    """One step where the model always samples `token`; finishes sequences at max_tokens."""
    batch = sched.schedule()
    for seq in sched.advance(batch, [token] * len(batch.seqs)):
        if len(seq.output_ids) >= seq.params.max_tokens:
            sched.finish(seq, "length")
    return batch


def new_seq(rid, prompt, max_tokens=4):
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens))


def test_shared_prefix_is_served_from_the_cache():
    blocks = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    prefix = list(range(10, 22))  # 3 full blocks
    a, b = new_seq(0, prefix + [1, 2]), new_seq(1, prefix + [3, 4, 5])
    sched.add(a)
    assert drive(sched).num_new == [14]
    assert (sched.queried_tokens, sched.hit_tokens) == (14, 0)
    sched.add(b)
    batch = drive(sched)
    assert batch.seqs == [a, b] and batch.num_new == [1, 3]
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert all(blocks.ref_count(x) == 2 for x in a.block_table[:3])
    shared = a.block_table[:3]
    assert (sched.queried_tokens, sched.hit_tokens) == (14 + 15, 12)

    # after both finish the blocks are evictable, still found, and counted free
    while sched.has_work():
        drive(sched)
    assert blocks.num_used == 0 and blocks.num_free == 31
    c = new_seq(2, prefix + [9])
    sched.add(c)
    batch = drive(sched)
    assert batch.num_new == [1] and c.block_table[:3] == shared
    assert blocks.num_free == 31 - 4


def test_a_fully_cached_request_still_computes_its_last_token():
    blocks = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    prompt = list(range(30, 42))  # exactly 3 full blocks
    sched.add(new_seq(0, prompt, max_tokens=1))
    drive(sched)
    same = new_seq(1, prompt, max_tokens=1)
    sched.add(same)
    batch = drive(sched)
    assert batch.num_new == [4] and same.num_cached_tokens == 8  # last block dropped from the hit
    assert same.output_ids == [7] and same.finished
    longer = new_seq(2, prompt + [1], max_tokens=1)
    sched.add(longer)
    assert drive(sched).num_new == [1] and longer.num_cached_tokens == 12


def drive_scoring(sched: Scheduler, token: int = 7):
    """drive(), with each prompt-logprob row the step scores handed to its sequence (as the engine does)."""
    batch = sched.schedule()
    rows = [(seq, p) for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new)
            for p in seq.prompt_rows(start, n)]
    for seq, p in rows:
        seq.take_prompt_row(p, -1.0, [])
    for seq in sched.advance(batch, [token] * len(batch.seqs)):
        if len(seq.output_ids) >= seq.params.max_tokens:
            sched.finish(seq, "length")
    return batch, [p for _, p in rows]


def scored_seq(rid, prompt, max_tokens=2, rows_done=0):
    seq = Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens, prompt_logprobs=1))
    for p in range(rows_done):
        seq.take_prompt_row(p, -1.0, [])
    return seq


def test_prompt_logprobs_skip_the_cached_prefix_and_chunk_at_the_row_cap():
    blocks = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64, max_prompt_rows=5)
    prefix = list(range(10, 22))  # 3 full blocks
    a = new_seq(0, prefix + [1, 2], max_tokens=8)
    sched.add(a)
    drive(sched)
    b = scored_seq(1, prefix + [3, 4, 5])
    assert b.prompt_logprobs == [None] * 15 and b.prompt_rows(0, 15) == range(0, 14)
    sched.add(b)
    steps = [drive_scoring(sched) for _ in range(3)]
    assert [batch.num_new for batch, _ in steps] == [[1, 5], [1, 5], [1, 5]]
    assert b.num_cached_tokens == 0                           # no prefix hit: every row is computed
    assert [rows for _, rows in steps] == [list(range(0, 5)), list(range(5, 10)), list(range(10, 14))]
    assert b.prompt_rows_done == 14 and all(e is not None for e in b.prompt_logprobs[1:])
    assert b.output_ids == [7]                                # the last chunk sampled its first token

    # rows already computed (a request readmitted after preemption) may come from the cache, up to
    # the first missing row
    done = scored_seq(2, prefix + [3, 4, 5], rows_done=14)
    sched.add(done)
    batch, rows = drive_scoring(sched)
    assert done.num_cached_tokens == 12 and rows == [] and batch.num_new[-1] == 3
    partial = scored_seq(3, prefix + [3, 4, 5], rows_done=6)
    sched.add(partial)
    batch, rows = drive_scoring(sched)
    assert partial.num_cached_tokens == 4 and batch.num_new[-1] == 7 and rows == [6, 7, 8, 9, 10]
    plain = new_seq(4, prefix + [3, 4, 6])                    # and a request without them hits as before
    fork = new_seq(5, prefix + [3, 4, 5])   # one with partial's prompt forks off partial's last chunk
    sched.add(fork)
    sched.add(plain)
    batch, rows = drive_scoring(sched)
    assert plain.num_cached_tokens == 12 and rows == [11, 12, 13]
    assert batch.seqs[-3:] == [partial, fork, plain] and batch.num_new[-3:] == [4, 0, 3]
    assert fork.num_cached_tokens == 15 and fork.block_table == partial.block_table
    assert fork.output_ids == partial.output_ids == [7] and fork.prompt_logprobs is None


def test_prompt_rows_cap_is_shared_by_a_step():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64, max_prompt_rows=6)
    x, y, z = scored_seq(0, range(20, 30)), scored_seq(1, range(40, 45)), new_seq(2, range(50, 60))
    for s in (x, y, z):
        sched.add(s)
    batch, rows = drive_scoring(sched)
    assert batch.seqs == [x] and batch.num_new == [6]         # y waits (arrival order), and z behind it
    batch, rows = drive_scoring(sched)
    assert batch.seqs == [x, y, z] and batch.num_new == [4, 3, 10] and len(rows) == 6  # x's last is its sample row
    assert y.prompt_rows_done == 3 and y.num_computed == 3


def test_prefix_caching_off_shares_nothing():
    blocks = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64, enable_prefix_caching=False)
    prompt = list(range(12)) + [5]
    sched.add(new_seq(0, prompt))
    drive(sched)
    sched.add(new_seq(1, prompt))
    assert drive(sched).num_new == [1, 13]
    assert sched.hit_tokens == sched.queried_tokens == 0 and blocks.num_cached == 0


def test_blocks_are_allocated_as_the_sequence_grows():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(blocks, max_batch_size=2, max_num_tokens=4, max_seq_len=256)
    seq = new_seq(0, list(range(10)), max_tokens=100)
    sched.add(seq)
    drive(sched)
    assert len(seq.block_table) == 1 and seq.num_computed == 4  # the first chunk only
    drive(sched)
    drive(sched)
    assert len(seq.block_table) == 3 and seq.num_computed == 10 and len(seq.output_ids) == 1
    drive(sched)
    drive(sched)
    assert len(seq.block_table) == 3 and seq.num_computed == 12
    drive(sched)
    assert len(seq.block_table) == 4 and blocks.num_used == 4


def test_preemption_recomputes_the_latest_arrival_and_keeps_its_output():
    blocks = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    a, b = new_seq(0, [1, 2, 3, 4], max_tokens=3), new_seq(1, [5, 6, 7, 8], max_tokens=3)
    sched.add(a)
    sched.add(b)
    drive(sched)  # both prefill: all 4 blocks used
    assert blocks.num_free == 0 and b.output_ids == [7]
    batch = drive(sched)  # a needs a 3rd block: b gives its blocks up
    assert batch.seqs == [a] and sched.num_preemptions == 1 and b.num_preemptions == 1
    assert list(sched.waiting) == [b] and b.num_computed == 0 and b.block_table == []
    assert b.output_ids == [7]  # kept; recomputed later
    c = new_seq(2, [9], max_tokens=1)
    sched.add(c)
    assert drive(sched).seqs == [a] and list(sched.waiting) == [b, c]  # c fits but must not overtake b
    assert drive(sched).seqs == [b, c]
    assert b.num_cached_tokens == 2  # b's head block was still cached; its tail went to a
    while sched.has_work():
        drive(sched)
    assert a.output_ids == b.output_ids == [7, 7, 7] and c.output_ids == [7]
    assert blocks.num_used == 0


def test_a_request_larger_than_the_pool_is_refused():
    sched = Scheduler(BlockManager(num_blocks=5, block_size=4), max_batch_size=2, max_num_tokens=64, max_seq_len=64)
    sched.add(new_seq(0, [1] * 10, max_tokens=6))  # 16 tokens: exactly the 4 usable blocks
    with pytest.raises(ValueError, match="lower max_tokens"):
        sched.add(new_seq(1, [1] * 10, max_tokens=7))
    assert len(sched.waiting) == 1


def test_waiting_request_is_not_overtaken_by_a_smaller_one():
    blocks = BlockManager(num_blocks=7, block_size=2)  # 6 usable blocks
    sched = Scheduler(blocks, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    a, big, small = new_seq(0, [1] * 7, 5), new_seq(1, [2] * 9, 2), new_seq(2, [3], 1)
    for s in (a, big, small):
        sched.add(s)
    batch = drive(sched)
    assert batch.seqs == [a] and list(sched.waiting) == [big, small]  # big needs 5 blocks, 2 are free


def test_abort_frees_blocks_of_running_and_waiting_requests():
    blocks = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(blocks, max_batch_size=2, max_num_tokens=64, max_seq_len=64)
    prefix = list(range(8))
    a, b, c = new_seq(0, prefix + [1]), new_seq(1, prefix + [2]), new_seq(2, [3])
    sched.add(a)
    drive(sched)
    sched.add(b)
    sched.add(c)
    drive(sched)
    assert sched.running == [a, b] and list(sched.waiting) == [c]
    assert sched.abort(2) and c.finish_reason == "abort" and not sched.waiting
    shared = a.block_table[:2]
    assert sched.abort(0) and a.block_table == [] and sched.running == [b]
    assert all(blocks.ref_count(x) == 1 for x in shared) and blocks.num_used == 3
    assert not sched.abort(0) and not sched.abort(99)
    batch = sched.schedule()
    assert sched.abort(1)  # between a step's schedule and its advance
    assert sched.advance(batch, [5]) == [] and b.output_ids == [7]
    assert not sched.has_work() and blocks.num_used == 0


# ---- forks: the choices of one request (same prompt, each its own seed) -----------------------------

def with_choices(rng: random.Random, requests, cfg):
    """Some requests become 2-4 choices arriving together (seeds 0..k-1, each its own max_tokens);
    more aborts, so that leaders and followers are aborted before and after the fork."""
    out, seeds = [], {}
    for when, prompt, max_tokens in requests:
        k = rng.choice([1, 2, 3, 4])
        for i in range(k):
            if k > 1:
                seeds[len(out)] = i
            out.append((when, prompt, rng.randint(1, max_tokens) if i else max_tokens))
    cfg = dict(cfg, caching=rng.random() < 0.9, block_manager=CountingBlocks, seeds=seeds,
               aborts=[(rng.randint(0, 40), rng.randrange(len(out))) for _ in range(rng.randint(0, 4))])
    return out, cfg


@pytest.mark.parametrize("mode", ["one step", "pp=2", "pp=3", "ahead", "ahead, some", "ahead, split", "scored"])
def test_random_choices_fork_exactly_and_never_leak(mode):
    """Choices fork off their leader's prefill and share its blocks (the partial last one too) until
    each writes: reference counts always equal the tables' references, no write lands in a block
    another sequence holds (but the sequences forking off that very chunk), every read finds the
    K/V of its own prefix (private copies included), every output is its solo run's, every
    reference is dropped exactly once, across preemption, aborts and prefix-cache eviction."""
    rng = random.Random(sum(map(ord, mode)))
    extra = {"one step": {}, "pp=2": {"depth": 2}, "pp=3": {"depth": 3},
             "ahead": {"run_ahead": lambda s: True},
             "ahead, some": {"run_ahead": lambda s: s.request_id % 3 != 0},
             "ahead, split": {"run_ahead": lambda s: True, "min_micro_batch": 2}, "scored": {}}[mode]
    stats = {}
    preemptions = 0
    for _ in range(250):
        requests, cfg = with_choices(rng, *random_workload(rng))
        scored = set()
        if mode == "scored":  # the first choice asks for prompt logprobs (the others fork off it)
            scored = {i for i in range(len(requests)) if cfg["seeds"].get(i) == 0 or rng.random() < 0.2}
            extra = {"max_prompt_rows": rng.randint(1, 6)}
        sched, _ = simulate(requests, **cfg, **extra, stats=stats, scored=scored)
        preemptions += sched.num_preemptions
        assert sched.num_forks <= len(cfg["seeds"])
    assert stats["forks"] > 300 and stats["copies"] > 100 and preemptions > 50, (stats, preemptions)


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8, 9])
def test_choices_prefill_the_prompt_once_and_copy_its_partial_block(prompt_len):
    """4 choices of a prompt: the first prefills it, the others sample their first tokens from its
    last position in the same step and share its blocks; at their first decode step three of the four
    copy the partial last block (none when the prompt fills its blocks), the last writes in place."""
    bs = 4
    blocks = CountingBlocks(num_blocks=32, block_size=bs)
    sched = Scheduler(blocks, max_batch_size=8, max_num_tokens=64, max_seq_len=64)
    prompt = list(range(10, 10 + prompt_len))
    seqs = [Sequence(i, list(prompt), SamplingParams(max_tokens=3, seed=i)) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    first = sched.schedule()
    assert first.seqs == seqs and first.num_new == [prompt_len, 0, 0, 0] and first.copies == []
    assert all(s.block_table == seqs[0].block_table for s in seqs)
    assert all(blocks.ref_count(b) == 4 for b in seqs[0].block_table)
    assert sched.prefilled_tokens == prompt_len and sched.num_forks == 3
    sched.advance(first, [1, 2, 3, 4])
    assert [s.output_ids for s in seqs] == [[1], [2], [3], [4]]
    second = sched.schedule()
    assert second.num_new == [1] * 4
    partial = prompt_len % bs != 0
    shared = seqs[0].block_table[:prompt_len // bs]  # full blocks stay shared
    assert len(second.copies) == (3 if partial else 0) and sched.prefilled_tokens == prompt_len
    if partial:
        src = blocks.blocks_for(prompt_len) - 1
        old = seqs[3].block_table[src]          # the last writer keeps the block
        assert [c[0] for c in second.copies] == [old] * 3 and blocks.ref_count(old) == 1
        assert [c[1] for c in second.copies] == [s.block_table[src] for s in seqs[:3]]
    assert all(s.block_table[:len(shared)] == shared for s in seqs)
    assert all(blocks.ref_count(b) == 4 for b in shared)
    tails = [tuple(s.block_table[len(shared):]) for s in seqs]
    assert len(set(b for t in tails for b in t)) == sum(map(len, tails))  # nothing else shared
    sched.advance(second, [5, 6, 7, 8])
    for seq in seqs:
        sched.finish(seq, "abort")
    assert blocks.num_used == 0 and blocks.taken == blocks.dropped


def test_followers_of_a_preempted_or_aborted_leader_wait_again():
    """A leader preempted before its last chunk sends its followers back to the waiting queue, where
    they join it again once it is readmitted; a leader aborted before it hands over its prompt leaves
    the next choice to lead."""
    blocks = CountingBlocks(num_blocks=32, block_size=4)
    sched = Scheduler(blocks, max_batch_size=8, max_num_tokens=4, max_seq_len=64)
    prompt = list(range(10, 20))  # three chunks of at most 4 tokens
    lead, *rest = [Sequence(i, list(prompt), SamplingParams(max_tokens=2, seed=i)) for i in range(3)]
    for seq in (lead, *rest):
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [lead] and [s.leader for s in rest] == [lead, lead]
    sched.advance(batch, [0])
    sched._preempt(lead)
    assert list(sched.waiting) == [lead, *rest] and not lead.followers and sched.running == []
    batch = sched.schedule()
    assert batch.seqs == [lead] and lead.followers == rest
    sched.advance(batch, [0])
    assert sched.abort(0) and list(sched.waiting) == rest and rest[0].leader is None
    batch = sched.schedule()  # two blocks are cached: rest[0]'s last chunk, and rest[1] forks off it
    assert batch.seqs == rest and batch.num_new == [2, 0] and rest[0].num_cached_tokens == 8
    assert sched.prefilled_tokens == 4 + 4 + 2 and sched.num_forks == 1
    sched.advance(batch, [1, 2])
    assert [s.output_ids for s in rest] == [[1], [2]]
    for seq in rest:
        sched.finish(seq, "abort")
    assert blocks.num_used == 0 and blocks.taken == blocks.dropped
