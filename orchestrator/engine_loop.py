"""Rank 0's control-plane driver: schedule a step, broadcast its StepPlan, run rank 0's share,
take the sampled ids back and advance every sequence."""
from __future__ import annotations

import random

import torch

from orchestrator.block_manager import BlockManager
from orchestrator.errors import UserError
from orchestrator.sampling_params import SamplingParams
from orchestrator.scheduler import ScheduledBatch, Scheduler
from orchestrator.sequence import Sequence

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for output token `index` of a request seeded with `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def check_prompt(meta, prompt_ids: list[int], params: SamplingParams) -> None:
    """Refuse what the engine can never run: empty or out-of-vocabulary prompts, or too long ones."""
    if not prompt_ids:
        raise UserError("the prompt is empty: send at least one token")
    bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
           or not 0 <= t < meta.spec.vocab_size]
    if bad:
        raise UserError(f"prompt token {bad[0]!r} is outside the vocabulary 0..{meta.spec.vocab_size - 1}")
    if len(prompt_ids) + params.max_tokens > meta.max_seq_len:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                        f"engine's max_seq_len {meta.max_seq_len}; shorten the prompt or lower max_tokens")


class EngineLoop:
    def __init__(self, runner, meta, broadcast, tokenizer=None):
        """runner: this rank's StepRunner; broadcast(plan): sends the plan to the other ranks."""
        self.runner, self.meta, self.broadcast, self.tokenizer = runner, meta, broadcast, tokenizer
        self.blocks = BlockManager(runner.num_blocks, meta.kv_block_size)
        self.scheduler = Scheduler(self.blocks, meta.max_batch_size, meta.max_num_tokens, meta.max_seq_len)
        self.eos_ids = set(meta.spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._rng = random.Random()
        self._next_id = 0

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        check_prompt(self.meta, prompt_ids, params)
        seq = Sequence(self._next_id, list(prompt_ids), params)
        if self.blocks.blocks_for(self.scheduler.kv_need(seq)) > self.blocks.num_blocks - 1:
            raise UserError(f"request needs more KV blocks than the pool holds ({self.blocks.num_blocks - 1}); "
                            "lower max_tokens")
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def _plan(self, batch: ScheduledBatch):
        from workers.step_plan import StepPlan
        bs = self.blocks.block_size
        ids, pos, slots, ctx = [], [], [], []
        width = max(len(s.block_table) for s in batch.seqs)
        tables = torch.zeros((len(batch.seqs), width), dtype=torch.int64)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed
            toks = seq.all_ids[start:start + n]
            ids += toks
            pos += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            ctx.append(start + n)
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table)
        params = [s.params for s in batch.seqs]
        seeds = [step_seed(p.seed, len(s.output_ids)) if p.seed is not None else self._rng.getrandbits(63)
                 for s, p in zip(batch.seqs, params)]
        t = lambda xs, dt=torch.int64: torch.tensor(xs, dtype=dt)  # noqa: E731
        return StepPlan(t(ids), t(pos), t(slots), t(batch.num_new), t(ctx), tables,
                        t([p.top_k for p in params]), t(seeds),
                        t([float(p.temperature) for p in params], torch.float32),
                        t([float(p.top_p) for p in params], torch.float32),
                        return_logits=any(p.return_logits and not s.output_ids
                                          for s, p in zip(batch.seqs, params)))

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("scheduler produced an empty step while requests wait")
        plan = self.broadcast(self._plan(batch))
        ids, logits = self.runner.run(plan)
        done = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            seq.num_computed += n
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk that has not reached the prompt's end
            if logits is not None and seq.params.return_logits and not seq.output_ids:
                seq.first_logits = logits[i].tolist()
            seq.output_ids.append(int(ids[i]))
            reason = self._finish_reason(seq)
            if reason:
                self.scheduler.finish(seq, reason)
                done.append(seq)
        return done

    def _finish_reason(self, seq: Sequence) -> str | None:
        if seq.output_ids[-1] in self.eos_ids:
            return "stop"
        if seq.params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids)
            if any(s in text for s in seq.params.stop):
                return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.meta.max_seq_len:
            return "length"
        return None

    def run_all(self, on_done=None) -> None:
        while self.scheduler.has_work():
            for seq in self.step():
                if on_done:
                    on_done(seq)

    def final_text(self, seq: Sequence) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(seq.output_ids)
        cuts = [text.find(s) for s in seq.params.stop if s in text]
        return text[: min(cuts)] if cuts else text
