"""Continuous batching over a paged KV cache, with preemption by recompute and prefix caching
(torch-free).

Each step first gives every running sequence its next tokens (a decode token, or the next chunk of
its prefill) in arrival order, then admits waiting sequences in arrival order while the token
budget, the batch size and the free blocks allow; a waiting sequence is never overtaken. Blocks
are allocated as a sequence grows. When a running sequence's next tokens need blocks that are not
free, the running sequence that arrived last gives up its blocks and goes back to the waiting
queue; it recomputes its prompt and the tokens it already generated when readmitted.

Micro-batches (pipeline parallelism): several steps may be in flight at once. A scheduled sequence
is in flight until `advance` takes its step's result; `schedule` skips it (its next token depends on
that result), never preempts it, and when only in-flight work could free the blocks a sequence
needs, the sequence waits for it instead of preempting itself. Each step takes at most
`token_budget()` tokens: the tokens in flight and waiting split evenly over the micro-batches, so
the pipeline stages get steps of about equal work.

Scheduling ahead (one stage, `run_ahead` given): a sequence in the one step in flight may be in
the next step too, so the device never waits for the host between steps. Its next prompt chunk
is known; its next decode token is not yet, and the step names it by its row in the step in flight
(the ranks take it from there on the device). A sequence that the token in flight will finish by
length is not scheduled ahead; one that `run_ahead` refuses (its sampling needs that token on the
host: penalties, a grammar) makes the scheduler wait for the step in flight instead.

Prompt log-probabilities: a sequence that asks for them computes logits at every prompt position
whose row it lacks, so it takes no cached prefix past the first such position, and a step scores at
most `max_prompt_rows` such rows in all (their logits are vocabulary-wide): its chunk stops there.

Forks (several sequences with one prompt, as the choices of a request with `n` > 1): a waiting
sequence whose prompt a running one (its leader, which arrived earlier and has no output yet) is
still prefilling does not compute it. It joins the running sequences holding nothing, and in the
step with the leader's last prompt chunk it becomes a row of its own right after the leader, that
feeds no token and samples from the leader's last position (with its own seed and settings); from
then on it shares every block of the prompt, the partial last one included (reference counts).
Each block is written only while one sequence holds it: a sequence about to write into a block
another holds too (the shared partial block, at its first generated token) takes a fresh block
instead, and the step's `copies` tell every rank to copy the shared block's K/V into it before
the step's forward pass. A leader that is preempted or aborted before the fork sends its followers
back to the waiting queue. `prefilled_tokens` counts the prompt tokens steps computed.

Invariant: running and waiting are each in arrival order, and with one step in flight at a time
running followed by waiting is too, so the victim is the most recently admitted sequence (the
latest one not in flight) and the oldest request always advances.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from meshserve.orchestrator.block_manager import BlockManager
from meshserve.orchestrator.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence feeds this step
    starts: list[int] = field(default_factory=list)  # the position of each one's first new token
    # (sequence, position) of each prompt-logprob row the step scores, in plan order (set by the engine loop)
    prompt_rows: list = field(default_factory=list)
    # (source, destination) KV blocks every rank copies before the step's forward pass: a sequence's
    # private copy of a block it shared, made before it writes there
    copies: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 enable_prefix_caching: bool = True, num_micro_batches: int = 1, min_micro_batch_size: int = 1,
                 run_ahead: Callable[[Sequence], bool] | None = None, max_prompt_rows: int | None = None):
        """max_prompt_rows: most prompt-logprob rows one step scores (None: max_num_tokens).
        min_micro_batch_size: on one stage with two steps in flight, split the live sequences into
        two steps only once each gets this many (below it: one step takes them all, and with
        run_ahead the next step runs ahead of it). run_ahead(seq): whether seq's next decode token may
        be fed before it is known on the host (None: never schedule ahead)."""
        if max_batch_size < 1 or max_num_tokens < 1:
            raise ValueError(f"max_batch_size={max_batch_size}, max_num_tokens={max_num_tokens}: use >= 1")
        if max_prompt_rows is not None and max_prompt_rows < 1:
            raise ValueError(f"max_prompt_rows={max_prompt_rows}: use >= 1")
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches={num_micro_batches}: use >= 1 (the pipeline depth)")
        self.num_micro_batches = num_micro_batches
        self.min_micro_batch_size = min_micro_batch_size
        self.in_flight_tokens = 0  # tokens of the steps scheduled and not yet advanced
        self.run_ahead = run_ahead
        self.blocks = blocks
        self.max_batch_size, self.max_num_tokens, self.max_seq_len = max_batch_size, max_num_tokens, max_seq_len
        self.enable_prefix_caching = enable_prefix_caching
        self.max_prompt_rows = max_prompt_rows or max_num_tokens
        self._rows_left = 0  # prompt-logprob rows the step being scheduled may still score
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.queried_tokens = 0  # tokens looked up in the prefix cache at admissions
        self.hit_tokens = 0      # of those, tokens found
        self.prefilled_tokens = 0  # prompt tokens fed to steps (again after a preemption; not cached or forked ones)
        self.num_forks = 0       # sequences that took their prompt from a leader's prefill
        self._copies: list[tuple[int, int]] = []  # of the step being scheduled
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request. One that could not fit the pool even alone is refused (ValueError):
        it would preempt itself forever."""
        if self.blocks.blocks_for(self.kv_need(seq)) > self.blocks.num_blocks - 1:
            raise ValueError(f"request {seq.request_id} needs {self.blocks.blocks_for(self.kv_need(seq))} KV "
                             f"blocks, more than the pool holds ({self.blocks.num_blocks - 1}); lower max_tokens")
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_need(self, seq: Sequence) -> int:
        """Tokens the sequence may hold in the KV cache at most (it must fit the pool alone)."""
        return min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_seq_len)

    def token_budget(self) -> int:
        """Most tokens one step takes. Under PP (several micro-batches of any size) the tokens in flight
        and those waiting to be computed split evenly over the micro-batches, so a long prompt is
        chunked across them instead of making one stage's step many times the others'; otherwise
        max_num_tokens."""
        if self.num_micro_batches == 1 or self.min_micro_batch_size > 1:
            return self.max_num_tokens
        pending = sum(s.num_tokens - s.num_computed for s in self.running if not s.in_flight and s.leader is None)
        pending += sum(s.num_tokens - s.num_computed for s in self.waiting)
        share = -(-(pending + self.in_flight_tokens) // self.num_micro_batches)
        return max(1, min(self.max_num_tokens, share))

    def schedule(self) -> ScheduledBatch:
        """The next step, over sequences not in flight (and, scheduling ahead, those in the one step
        in flight); they are in flight on return. Every scheduled sequence's block_table covers
        positions [0, start + n), and no new token lands in a block another sequence holds (the
        batch's `copies` come first). A fork row (0 new tokens) follows its leader's row."""
        budget, cap = self.token_budget(), self.micro_batch_size()
        splits = self._splits()
        ahead = self.run_ahead is not None and not splits
        if any(s.in_flight for s in self.running) and not splits and (not ahead or self._must_wait()):
            return ScheduledBatch([], [])  # below the minimum: the step in flight has them all
        seqs: list[Sequence] = []
        num_new: list[int] = []
        starts: list[int] = []
        self._rows_left = self.max_prompt_rows
        self._copies = []
        ends: dict[int, int] = {}  # id(seq) -> start + n of the sequences in this step so far
        blocked = False  # something was preempted, or a sequence waits for blocks: admit nobody
        i = 0
        while i < len(self.running) and budget > 0 and len(seqs) < cap:
            seq = self.running[i]
            i += 1
            if seq.leader is not None:  # it forks off its leader's prompt (in the leader's last chunk)
                continue
            if seq.in_flight:
                n = self._ahead(seq, budget) if ahead and seq.in_flight == 1 else 0
                if n:
                    seqs.append(seq)
                    num_new.append(n)
                    starts.append(seq.scheduled_to)
                    ends[id(seq)] = seq.scheduled_to + n
                    budget -= n
                continue
            n = self._take_rows(seq, seq.num_computed, min(seq.num_tokens - seq.num_computed, budget))
            if n == 0:  # its next rows wait for a later step
                continue
            while self._need(seq, seq.num_computed, n) > self.blocks.num_free:
                victim = self._victim(after=seq)
                if victim is None:
                    break
                self._preempt(victim)
                blocked = True
            if self._need(seq, seq.num_computed, n) > self.blocks.num_free:  # no later sequence left to give way
                blocked = True
                if not any(s.in_flight for s in self.running):
                    self._preempt(seq)
                break  # else wait: in-flight steps will finish or become victims
            self._grow(seq, seq.num_computed, n)
            seqs.append(seq)
            num_new.append(n)
            starts.append(seq.num_computed)
            ends[id(seq)] = seq.num_computed + n
            budget -= n
        while not blocked and self.waiting and len(self.running) < self.max_batch_size:
            leader = self._leader_for(self.waiting[0], ends)
            if leader is not None:  # joins now, holding nothing; its row comes with the leader's last chunk
                seq = self.waiting.popleft()
                _insert_by_arrival(self.running, seq)
                seq.leader = leader
                leader.followers.append(seq)
                continue
            if budget <= 0 or len(seqs) >= cap:
                break
            n = self._admit(self.waiting[0], budget)
            if n == 0:
                break
            seq = self.waiting.popleft()
            _insert_by_arrival(self.running, seq)
            seqs.append(seq)
            num_new.append(n)
            starts.append(seq.num_computed)
            ends[id(seq)] = seq.num_computed + n
            budget -= n
        if any(s.followers for s in seqs):
            seqs, num_new, starts = self._with_forks(seqs, num_new, starts)
        for seq, start, n in zip(seqs, starts, num_new):
            seq.in_flight += 1
            seq.scheduled_to = start + n
            prompt_len = len(seq.prompt_ids)
            if start < prompt_len:
                self.prefilled_tokens += min(start + n, prompt_len) - start
        self.in_flight_tokens += sum(num_new)
        return ScheduledBatch(seqs, num_new, starts, copies=self._copies)

    def _leader_for(self, seq: Sequence, ends: dict[int, int]) -> Sequence | None:
        """The running sequence whose prefill `seq` (waiting) may fork off: it arrived earlier, has
        the same prompt and no output, and its last prompt chunk is in this step or still to come.
        None when seq computes its own prompt (it has output, wants prompt logprobs, or no
        sequence fits; or prefix sharing is off)."""
        if not self.enable_prefix_caching or seq.output_ids or seq.prompt_logprobs is not None:
            return None
        prompt_len = len(seq.prompt_ids)
        for lead in self.running:
            if (lead.output_ids or lead.leader is not None or lead.arrival > seq.arrival
                    or lead.prompt_ids != seq.prompt_ids):
                continue
            end = ends.get(id(lead))
            if end is not None and end <= prompt_len:  # a prompt chunk of it is in this step (the last one?)
                return lead
            if end is None and (lead.scheduled_to if lead.in_flight else lead.num_computed) < prompt_len:
                return lead  # its last chunk is still to be scheduled
        return None

    def _with_forks(self, seqs: list[Sequence], num_new: list[int], starts: list[int]):
        """The step's rows with a fork row after each leader whose last prompt chunk it holds: the
        follower takes the leader's blocks (every one, shared) and samples from its last position."""
        out: tuple[list, list, list] = ([], [], [])
        for seq, n, start in zip(seqs, num_new, starts):
            for part, v in zip(out, (seq, n, start)):
                part.append(v)
            prompt_len = len(seq.prompt_ids)
            if not seq.followers or n == 0 or start + n != prompt_len:
                continue
            for f in seq.followers:
                f.leader = None
                f.block_table = list(seq.block_table)
                self.blocks.acquire(f.block_table)
                f.block_cids = list(seq.block_cids)
                f.num_computed = f.num_cached_tokens = prompt_len
                self.num_forks += 1
                self.queried_tokens += prompt_len
                self.hit_tokens += prompt_len
                for part, v in zip(out, (f, 0, prompt_len)):
                    part.append(v)
            seq.followers = []
        return out

    def _shared(self, seq: Sequence, pos: int) -> bool:
        """Whether position pos lands in a block of seq's table that another sequence holds too."""
        i = pos // self.blocks.block_size
        return i < len(seq.block_table) and self.blocks.ref_count(seq.block_table[i]) > 1

    def _need(self, seq: Sequence, start: int, n: int) -> int:
        """Free blocks seq takes to write positions [start, start + n): those past its table, and a
        private copy of the block `start` lands in when it is shared (only a fork's partial prompt
        block is: full shared blocks are never written)."""
        return max(0, self.blocks.blocks_for(start + n) - len(seq.block_table)) + self._shared(seq, start)

    def _grow(self, seq: Sequence, start: int, n: int) -> None:
        """Take the blocks _need counts (they are free); a shared block is copied (self._copies)."""
        if self._shared(seq, start):
            i = start // self.blocks.block_size
            src = seq.block_table[i]
            (seq.block_table[i],) = self.blocks.allocate(1)
            self.blocks.free([src])
            self._copies.append((src, seq.block_table[i]))
        more = self.blocks.blocks_for(start + n) - len(seq.block_table)
        if more > 0:
            seq.block_table += self.blocks.allocate(more)

    def _live(self) -> int:
        return min(self.max_batch_size, len(self.running) + len(self.waiting))

    def _splits(self) -> bool:
        """Whether the live sequences split over several steps: always under PP; on one stage with a
        minimum micro-batch size, once each of two steps gets the minimum."""
        if self.min_micro_batch_size > 1:
            return self._live() >= 2 * self.min_micro_batch_size
        return self.num_micro_batches > 1

    def micro_batch_size(self) -> int:
        """Most sequences one step takes: the live ones split evenly over two steps once each gets
        the minimum micro-batch size (under PP the token budget balances the steps instead)."""
        if self.min_micro_batch_size > 1 and self._splits():
            return max(self.min_micro_batch_size, -(-self._live() // self.num_micro_batches))
        return self.max_batch_size

    def _ends_with_token_in_flight(self, seq: Sequence) -> bool:
        return len(seq.output_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_seq_len

    def _must_wait(self) -> bool:
        """Scheduling ahead: a sequence whose next token in flight it may not feed unseen, and that
        the token does not finish, holds the next step back until the results are in."""
        return any(s.in_flight == 1 and s.scheduled_to == s.num_tokens and not self._ends_with_token_in_flight(s)
                   and not self.run_ahead(s) for s in self.running)

    def _ahead(self, seq: Sequence, budget: int) -> int:
        """Tokens `seq` (in the one step in flight) feeds the next step, its blocks allocated when
        free (no preemption for it); 0: none."""
        start = seq.scheduled_to
        if start == seq.num_tokens:  # its next input is the token the step in flight samples
            if self._ends_with_token_in_flight(seq):
                return 0
            n = 1
        else:  # the next chunk of its prompt
            n = self._take_rows(seq, start, min(seq.num_tokens - start, budget), commit=False)
            if n == 0:
                return 0
        if self._need(seq, start, n) > self.blocks.num_free:
            return 0
        self._take_rows(seq, start, n)
        self._grow(seq, start, n)
        return n

    def _take_rows(self, seq: Sequence, start: int, n: int, commit: bool = True) -> int:
        """How many of the n tokens from `start` seq feeds this step: all of them, unless their
        prompt-logprob rows exceed the rows the step has left (the chunk then stops at the last row
        that fits; 0: none fits). commit: count the rows as taken."""
        rows = seq.prompt_rows(start, n)
        if not rows:
            return n
        fits = min(len(rows), self._rows_left)
        if fits < len(rows):
            n = rows.start + fits - start
        if commit:
            self._rows_left -= fits
        return n

    def _victim(self, after: Sequence) -> Sequence | None:
        """The latest-arrived running sequence after `after` that is not in flight (a follower waiting
        to fork holds nothing, but goes back too: the waiting queue stays behind the running ones)."""
        for seq in reversed(self.running):
            if seq is after:
                return None
            if not seq.in_flight:
                return seq
        return None

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and the blocks of its first chunk; returns the
        chunk's length, or 0 (nothing taken) when the blocks are not free."""
        hit, cids = [], []
        if self.enable_prefix_caching:
            # leave at least the last token to compute, so the step yields its logits, and every
            # position whose prompt-logprob row is still wanted
            upto = seq.num_tokens - 1
            if seq.prompt_rows(0, seq.num_tokens):
                upto = min(upto, seq.prompt_rows_done)
            hit, cids = self.blocks.match(seq.all_ids, upto // self.blocks.block_size)
        cached = len(hit) * self.blocks.block_size
        n = self._take_rows(seq, cached, min(seq.num_tokens - cached, budget), commit=False)
        need = self.blocks.blocks_for(cached + n) - len(hit)
        revive = sum(1 for b in hit if self.blocks.ref_count(b) == 0)
        if n == 0 or need + revive > self.blocks.num_free:
            return 0
        self._take_rows(seq, cached, n)
        self.blocks.acquire(hit)
        seq.block_table = hit + self.blocks.allocate(need)
        seq.block_cids = cids
        seq.num_computed = seq.num_cached_tokens = cached
        if self.enable_prefix_caching:
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += cached
        return n

    def advance(self, batch: ScheduledBatch, sampled: list[int]) -> list[Sequence]:
        """After the ranks ran `batch` (its sequences are no longer in flight): each sequence's
        num_computed grows by its n, blocks it filled enter the prefix cache, and each sequence
        that caught up with its tokens gets its sampled id appended to output_ids; those are
        returned in batch order. Partial prefill chunks ignore their sampled id; sequences finished
        meanwhile (aborted) are skipped."""
        out = []
        bs = self.blocks.block_size
        self.in_flight_tokens -= sum(batch.num_new)
        for seq, n, tok in zip(batch.seqs, batch.num_new, sampled, strict=True):
            seq.in_flight -= 1
            if seq.finished:
                continue
            seq.num_computed += n
            if self.enable_prefix_caching and len(seq.block_cids) < seq.num_computed // bs:
                ids = seq.all_ids
                for b in range(len(seq.block_cids), seq.num_computed // bs):
                    parent = seq.block_cids[-1] if seq.block_cids else 0
                    seq.block_cids.append(self.blocks.register(seq.block_table[b], parent,
                                                               ids[b * bs:(b + 1) * bs]))
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(tok)
                out.append(seq)
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark the sequence finished and give back its blocks (it may be running or waiting)."""
        seq.finish_reason = reason
        self._unfork(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def abort(self, request_id: int) -> bool:
        """Drop an unfinished request wherever it is and free its blocks; False if not found."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        if seq.leader is None:  # (a follower loses nothing)
            seq.num_preemptions += 1
            self.num_preemptions += 1
        self._unfork(seq)
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        _insert_by_arrival(self.waiting, seq)

    def _unfork(self, seq: Sequence) -> None:
        """seq leaves the running sequences before a fork: as a follower it leaves its leader; as a
        leader its followers go back to the waiting queue (the first of them will lead)."""
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        for f in seq.followers:
            f.leader = None
            self.running.remove(f)
            _insert_by_arrival(self.waiting, f)
        seq.followers = []

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_cids = []


def _insert_by_arrival(queue, seq: Sequence) -> None:
    """Insert into an arrival-ordered list or deque (from the back: admissions land there)."""
    i = len(queue)
    while i > 0 and queue[i - 1].arrival > seq.arrival:
        i -= 1
    queue.insert(i, seq)
