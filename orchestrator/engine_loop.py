"""Rank 0's control-plane driver: schedule a step, broadcast its StepPlan, run rank 0's share,
take the sampled ids back and advance every sequence.

Under pipeline parallelism up to `pp` steps (micro-batches over disjoint sequences) are in flight:
rank 0 sends plan k, runs stage 0 on it, passes the hidden states on without waiting and schedules
plan k+1 while the later stages work on k; the results come back in plan order and rank 0 takes
the oldest when it cannot launch more.

With one stage on GPUs, two steps are in flight too. Below 2 x OVERLAP_MIN_BATCH live sequences the
loop schedules ahead (Scheduler's run_ahead): plan k+1 goes out while step k runs, its decode rows
naming step k's sampled ids, which stay on the device; rank 0 then takes step k's results and
advances the sequences while step k+1 runs, so the device does not wait for the host between steps.
From there on, two steps over the two halves of the live sequences alternate instead (measured
faster on H200 at 256 live sequences; see the README's figures). MESHSERVE_SCHEDULE_AHEAD=0 turns
both off, =1 turns them on for CPU ranks too (where a step runs inside its launch, so nothing
overlaps; the tests use it for exactness)."""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass

import torch

from meshserve.orchestrator.block_manager import BlockManager
from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import SamplingParams
from meshserve.orchestrator.scheduler import ScheduledBatch, Scheduler
from meshserve.orchestrator.sequence import Sequence

# From this many live sequences per step, two steps over disjoint halves keep the device busy while
# the host works on the other half's results (the weights are then read twice per token round).
OVERLAP_MIN_BATCH = 128

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
    bad = next((t for t in params.logit_bias if t >= meta.spec.vocab_size), None)
    if bad is not None:
        raise UserError(f"logit_bias token {bad} is outside the vocabulary 0..{meta.spec.vocab_size - 1}; "
                        "use token ids of this model's tokenizer")
    if len(prompt_ids) + params.max_tokens > meta.max_seq_len:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                        f"engine's max_seq_len {meta.max_seq_len}; shorten the prompt or lower max_tokens")


@dataclass
class TokenOutput:
    """One new token of one sequence, as a step produced it."""
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    # on a request's first token, when it asked for prompt logprobs: Sequence.prompt_logprobs
    prompt_logprobs: list | None = None



def _schedules_ahead(meta, mesh) -> bool:
    import os
    setting = os.environ.get("MESHSERVE_SCHEDULE_AHEAD", "")
    if setting not in ("", "0", "1"):
        raise UserError(f"MESHSERVE_SCHEDULE_AHEAD={setting!r}: use 1 (on), 0 (off) or leave it unset "
                        "(on for one stage on GPUs)")
    on_gpu = mesh is not None and mesh.device.type == "cuda"
    return meta.pp == 1 and (setting == "1" or (setting == "" and on_gpu))


def _feeds_unseen(seq: Sequence) -> bool:
    """Whether a step may take seq's next token before the host has it: not where sampling reads
    the token on the host (penalties over the history) or wants first logits. A grammar's mask
    needs the token too, but only at sampling time: see _Deferred."""
    p = seq.params
    return not p.penalized and not p.return_logits


class _Deferred:
    """A step launched ahead whose sampling waits for its grammar masks: they need the tokens of the
    step before it, which the host reads while this step's forward pass runs. `rows`: its rows
    with a grammar."""

    def __init__(self, rows: list[int]):
        self.rows = rows


def _grammar_rows(batch: ScheduledBatch) -> list[int]:
    """The rows of `batch` that sample a sequence's next token under a grammar (a mask applies)."""
    return [i for i, (s, n, start) in enumerate(zip(batch.seqs, batch.num_new, batch.starts))
            if s.grammar is not None and start + n >= s.num_tokens]  # > : scheduled ahead


class EngineLoop:
    def __init__(self, runner, meta, broadcast, tokenizer=None, enable_prefix_caching: bool = True,
                 depth: int | None = None):
        """runner: this rank's StepRunner; broadcast(plan): sends the plan to the other ranks;
        depth: most steps in flight (default: the pipeline depth pp; two when scheduling ahead)."""
        self.runner, self.meta, self.broadcast, self.tokenizer = runner, meta, broadcast, tokenizer
        self.ahead = depth is None and _schedules_ahead(meta, getattr(runner, "mesh", None))
        self.depth = 2 if self.ahead else depth or meta.pp
        self.blocks = BlockManager(runner.num_blocks, meta.kv_block_size)
        self.scheduler = Scheduler(self.blocks, meta.max_batch_size, meta.max_num_tokens, meta.max_seq_len,
                                   enable_prefix_caching=enable_prefix_caching,
                                   num_micro_batches=self.depth,
                                   min_micro_batch_size=OVERLAP_MIN_BATCH if self.ahead else 1,
                                   run_ahead=_feeds_unseen if self.ahead else None,
                                   max_prompt_rows=getattr(runner, "prompt_rows_per_step", None))
        self._rows_in_flight: dict[int, int] = {}  # id(seq) -> its row in the last plan launched
        self._in_flight: deque[tuple[ScheduledBatch, object]] = deque()  # (batch, PendingResult), oldest first
        self._next_step = 0
        self.max_in_flight = 0   # most steps ever in flight at once (pipeline overlap, for stats and tests)
        self.wait_s = 0.0        # time blocked on step results; the rest of the wall time is host work
        self.rows_ahead = 0      # decode rows that went out before their input token was on the host
        self.eos_ids = set(meta.spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._rng = random.Random()
        self._next_id = 0
        self._grammars = None

    @property
    def grammars(self):
        """The GrammarCompiler of this engine's tokenizer (made on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise UserError("structured output needs the engine's tokenizer, and this engine has none")
            from meshserve.orchestrator.grammar import GrammarCompiler
            self._grammars = GrammarCompiler(self.tokenizer.hf_tokenizer, self.meta.spec.vocab_size)
        return self._grammars

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        check_prompt(self.meta, prompt_ids, params)
        seq = Sequence(self._next_id, list(prompt_ids), params)
        if params.structured is not None:
            seq.grammar = self.grammars.matcher(params.structured)
        if self.blocks.blocks_for(self.scheduler.kv_need(seq)) > self.blocks.num_blocks - 1:
            raise UserError(f"the request needs more KV blocks than the pool holds ({self.blocks.num_blocks - 1} "
                            f"of {self.blocks.block_size} tokens); lower max_tokens or shorten the prompt")
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: int) -> bool:
        return self.scheduler.abort(request_id)

    def _plan(self, batch: ScheduledBatch):
        from meshserve.workers.runtime.rank_protocol import StepPlan
        bs = self.blocks.block_size
        seqs, params = batch.seqs, [s.params for s in batch.seqs]
        ids, pos, slots, ctx = [], [], [], []
        batch.prompt_rows, rows, targets = [], [], []
        for seq, n, start in zip(seqs, batch.num_new, batch.starts, strict=True):
            table = seq.block_table
            prompt_len = len(seq.prompt_ids)
            if n == 0:  # a fork: no token of its own; it samples from the row before it (its leader's last)
                ctx.append(start)
                continue
            if start == seq.num_tokens:  # scheduled ahead: its input is sampled by the step in flight
                ids.append(-1 - self._rows_in_flight[id(seq)])
                self.rows_ahead += 1
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            elif n == 1 and start >= prompt_len:  # a decode row: its last output token
                ids.append(seq.output_ids[start - prompt_len])
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                for p in seq.prompt_rows(start, n):  # row of position p: scores prompt token p + 1
                    batch.prompt_rows.append((seq, p))
                    rows.append(len(ids) + p - start)
                    targets.append(seq.prompt_ids[p + 1])
                ids += seq.all_ids[start:start + n]
                pos += range(start, start + n)
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            ctx.append(start + n)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int64)
        width = max([s.num_tokens for s, p in zip(seqs, params) if p.penalized], default=0)
        history = torch.full((len(seqs), width), -1, dtype=torch.int64)
        for i, (s, p) in enumerate(zip(seqs, params)):
            if p.penalized:
                history[i, : s.num_tokens] = torch.tensor(s.all_ids)
        # the seed of the output token a row samples (index start + n - prompt length)
        seeds = [step_seed(p.seed, start + n - len(s.prompt_ids)) if p.seed is not None else self._rng.getrandbits(63)
                 for s, p, start, n in zip(seqs, params, batch.starts, batch.num_new)]
        t = lambda xs, dt=torch.int64: torch.tensor(xs, dtype=dt)  # noqa: E731
        bias = [(i, tok, b) for i, p in enumerate(params) for tok, b in p.logit_bias.items()]
        masked = _grammar_rows(batch)
        extra = self._masks(batch, masked) if masked and not self.ahead else {}  # ahead: at sampling
        if bias:
            brows, toks, values = zip(*bias)
            extra.update(bias_rows=t(brows), bias_ids=t(toks), bias_values=t(values, torch.float32))
        if batch.copies:
            extra.update(copy_blocks=t(batch.copies))
        if rows:
            extra.update(prompt_rows=t(rows), prompt_targets=t(targets), num_prompt_logprobs=max(
                s.params.prompt_logprobs for s, _ in batch.prompt_rows))
        f = lambda name: t([float(getattr(p, name)) for p in params], torch.float32)  # noqa: E731
        return StepPlan(input_ids=t(ids), positions=t(pos), slot_mapping=t(slots), query_lens=t(batch.num_new),
                        context_lens=t(ctx), block_tables=tables, top_k=t([p.top_k for p in params]),
                        sample_seed=t(seeds), history=history, output_start=t([len(s.prompt_ids) for s in seqs]),
                        **{name: f(name) for name in ("temperature", "top_p", "min_p", "presence_penalty",
                                                      "frequency_penalty", "repetition_penalty")},
                        return_logits=any(p.return_logits and not s.output_ids for s, p in zip(seqs, params)),
                        num_logprobs=max([p.logprobs for p in params if p.logprobs is not None], default=-1),
                        share_ids=self.ahead, **extra)

    def _masks(self, batch: ScheduledBatch, rows: list[int]) -> dict:
        """The grammar masks of `rows` as StepPlan fields; rows whose sequence has ended (a token in
        flight finished it: the row is discarded) get none."""
        rows = [i for i in rows if not batch.seqs[i].finished and not batch.seqs[i].grammar.stopped]
        if not rows:
            return dict(mask_rows=torch.zeros(0, dtype=torch.int64),
                        token_mask=torch.zeros(0, self.grammars.words, dtype=torch.int64))
        masks = self.grammars.masks([batch.seqs[i].grammar for i in rows])
        return dict(mask_rows=torch.tensor(rows, dtype=torch.int64), token_mask=torch.from_numpy(masks).view(torch.int64))

    def _sample_deferred(self) -> None:
        """Sample the oldest step in flight if its sampling waits for grammar masks: every step before
        it has finished, so its sequences' grammars have taken their last tokens."""
        if self._in_flight and isinstance(self._in_flight[0][1], _Deferred):
            batch, deferred = self._in_flight[0]
            masks = self._masks(batch, deferred.rows)
            self._in_flight[0] = (batch, self.runner.sample_deferred(masks["mask_rows"], masks["token_mask"]))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def oldest_step_id(self) -> int:
        """The id of the oldest step in flight, else of the last one launched (for stall reports;
        safe to call from another thread)."""
        try:
            return self._in_flight[0][1].plan.step_id
        except (IndexError, AttributeError):
            return max(0, self._next_step - 1)

    def step(self) -> list[TokenOutput]:
        """Launch steps until `depth` are in flight or nothing else can run, then finish the oldest;
        returns every token it produced (finished sequences are marked)."""
        while len(self._in_flight) < self.depth and self._launch():
            pass
        if not self._in_flight:
            return []
        self._sample_deferred()
        outputs = self._complete(*self._in_flight.popleft())
        self._sample_deferred()
        return outputs

    def drain(self) -> list[TokenOutput]:
        """Finish every step in flight (before shutdown); returns their tokens."""
        outputs = []
        while self._in_flight:
            self._sample_deferred()
            outputs += self._complete(*self._in_flight.popleft())
        self.runner.flush()
        return outputs

    def _launch(self) -> bool:
        self._sample_deferred()  # a step's inputs may name the ids the deferred one samples
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return False
        plan = self._plan(batch)
        if self.ahead:
            self._rows_in_flight = {id(s): i for i, s in enumerate(batch.seqs)}
        plan.step_id = self._next_step
        self._next_step += 1
        plan = self.broadcast(plan)
        late = _grammar_rows(batch) if self.ahead else []
        handle = self.runner.launch(plan, defer_sampling=True) if late else self.runner.launch(plan)
        self._in_flight.append((batch, _Deferred(late) if late else handle))
        self.max_in_flight = max(self.max_in_flight, len(self._in_flight))
        return True

    def _complete(self, batch: ScheduledBatch, pending) -> list[TokenOutput]:
        start = time.perf_counter()
        result = pending.wait()
        self.wait_s += time.perf_counter() - start
        row = {id(s): i for i, s in enumerate(batch.seqs)}
        if batch.prompt_rows:
            self._take_prompt_rows(batch, result)
        outputs = []
        for seq in self.scheduler.advance(batch, result.ids.tolist()):
            i = row[id(seq)]
            out = TokenOutput(seq, seq.output_ids[-1])
            if result.logits is not None and seq.params.return_logits and len(seq.output_ids) == 1:
                seq.first_logits = result.logits[i].tolist()
            if result.logprobs is not None and seq.params.logprobs is not None:
                lps = result.logprobs[i].tolist()
                out.logprob = lps[0]
                out.top_logprobs = list(zip(result.top_ids[i].tolist(), lps[1:]))[: seq.params.logprobs]
            if seq.prompt_logprobs is not None and len(seq.output_ids) == 1:
                out.prompt_logprobs = seq.prompt_logprobs
            reason = self._finish_reason(seq)
            if reason:
                self.scheduler.finish(seq, reason)
                out.finished = True
            outputs.append(out)
        return outputs

    @staticmethod
    def _take_prompt_rows(batch: ScheduledBatch, result) -> None:
        """Hand each prompt-logprob row of the step to its sequence (not to one that ended meanwhile)."""
        lps, tops = result.prompt_logprobs.tolist(), result.prompt_top_ids.tolist()
        for (seq, p), lp, top in zip(batch.prompt_rows, lps, tops, strict=True):
            if not seq.finished:
                seq.take_prompt_row(p, lp[0], list(zip(top, lp[1:]))[: seq.params.prompt_logprobs])

    def _finish_reason(self, seq: Sequence) -> str | None:
        """Token-level stops only; stop strings belong to the text owner (meshserve.orchestrator.request_text).
        "error" when the sequence's grammar failed (making the mask, or refusing the token): seq.error
        says why, and the token is no part of the answer."""
        last, p = seq.output_ids[-1], seq.params
        stop_token = (last in self.eos_ids and not p.ignore_eos) or last in p.stop_token_ids
        grammar = seq.grammar
        if grammar is not None:
            if grammar.error is None and not stop_token:
                grammar.consume(last)
            if grammar.error is not None:  # a failed matcher's mask lets only the end token through
                from meshserve.orchestrator.grammar import failure_message
                seq.error = failure_message(grammar.error, len(seq.output_ids) - 1)
                return "error"
        if stop_token:
            return "stop"
        if grammar is not None and grammar.stopped:  # the output is complete
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.meta.max_seq_len:
            return "length"
        return None

    def run_all(self) -> None:
        """Step until every request has finished (tests and benchmarks; clients read step())."""
        while self.has_work():
            self.step()
