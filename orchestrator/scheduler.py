"""First-come-first-served continuous batching under max_batch_size and max_num_tokens (torch-free).

Running sequences decode one token each step; waiting ones are admitted when their whole KV need
(prompt + max_tokens, capped by max_seq_len) can be reserved, and prefill in chunks within the budget.
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
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int, max_seq_len: int):
        self.blocks = blocks
        self.max_batch_size, self.max_num_tokens, self.max_seq_len = max_batch_size, max_num_tokens, max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_need(self, seq: Sequence) -> int:
        return min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_seq_len)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_tokens
        seqs, num_new = [], []
        for seq in self.running:
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n > 0:
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            need = self.blocks.blocks_for(self.kv_need(seq))
            if need > self.blocks.num_free:
                break
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(need)
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
