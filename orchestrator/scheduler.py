"""Continuous batching over a paged KV cache, with preemption by recompute and prefix caching
(torch-free).

Each step first gives every running sequence its next tokens (a decode token, or the next chunk of
its prefill) in arrival order, then admits waiting sequences in arrival order while the token
budget, the batch size and the free blocks allow; a waiting sequence is never overtaken. Blocks
are allocated as a sequence grows. When a running sequence's next tokens need blocks that are not
free, the running sequence that arrived last gives up its blocks and goes back to the front of
the waiting queue; it recomputes its prompt and the tokens it already generated when readmitted.

Invariant: running (in order) followed by waiting (in order) is sorted by arrival, so the victim,
running[-1], is also the most recently admitted sequence, and the oldest request always advances.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from orchestrator.block_manager import BlockManager
from orchestrator.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence feeds this step


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 enable_prefix_caching: bool = True):
        if max_batch_size < 1 or max_num_tokens < 1:
            raise ValueError(f"max_batch_size={max_batch_size}, max_num_tokens={max_num_tokens}: use >= 1")
        self.blocks = blocks
        self.max_batch_size, self.max_num_tokens, self.max_seq_len = max_batch_size, max_num_tokens, max_seq_len
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.queried_tokens = 0  # tokens looked up in the prefix cache at admissions
        self.hit_tokens = 0      # of those, tokens found
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

    def schedule(self) -> ScheduledBatch:
        """The next step. On return every scheduled sequence's block_table covers positions
        [0, num_computed + n), and no new token lands in a block another sequence holds."""
        budget = self.max_num_tokens
        seqs: list[Sequence] = []
        num_new: list[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
            while need > self.blocks.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
            if need > self.blocks.num_free:  # seq is the last running one and still does not fit
                self._preempt(seq)
                preempted = True
                break
            if need > 0:
                seq.block_table += self.blocks.allocate(need)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            i += 1
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_batch_size):
            n = self._admit(self.waiting[0], budget)
            if n == 0:
                break
            seq = self.waiting.popleft()
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and the blocks of its first chunk; returns the
        chunk's length, or 0 (nothing taken) when the blocks are not free."""
        hit, cids = [], []
        if self.enable_prefix_caching:
            # leave at least the last token to compute, so the step yields its logits
            hit, cids = self.blocks.match(seq.all_ids, (seq.num_tokens - 1) // self.blocks.block_size)
        cached = len(hit) * self.blocks.block_size
        n = min(seq.num_tokens - cached, budget)
        need = self.blocks.blocks_for(cached + n) - len(hit)
        revive = sum(1 for b in hit if self.blocks.ref_count(b) == 0)
        if need + revive > self.blocks.num_free:
            return 0
        self.blocks.acquire(hit)
        seq.block_table = hit + self.blocks.allocate(need)
        seq.block_cids = cids
        seq.num_computed = seq.num_cached_tokens = cached
        if self.enable_prefix_caching:
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += cached
        return n

    def advance(self, batch: ScheduledBatch, sampled: list[int]) -> list[Sequence]:
        """After the ranks ran `batch`: each sequence's num_computed grows by its n, blocks it
        filled enter the prefix cache, and each sequence that caught up with its tokens gets its
        sampled id appended to output_ids; those are returned in batch order. Partial prefill
        chunks ignore their sampled id; sequences finished meanwhile (aborted) are skipped."""
        out = []
        bs = self.blocks.block_size
        for seq, n, tok in zip(batch.seqs, batch.num_new, sampled, strict=True):
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
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_cids = []

