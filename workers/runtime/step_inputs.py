"""A step's inputs on the device: persistent buffers, filled by one host-to-device copy per step.

Every index a stage needs (token ids, positions, KV slots, where each sequence's tokens start, its
key count, its block table row, which token rows the last stage scores) lives in one int32 device buffer laid out for
the largest step the engine allows. A step writes its plan into a host staging copy of that layout
and copies it over in one transfer; the views into the buffer stay put, which is what lets a
captured CUDA graph read a new step's inputs. Decode steps can be padded up to a batch-size bucket
with rows that attend only to the scratch KV block 0 (never handed to a sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

_ALIGN = 16  # int32 elements: each region of a step's inputs starts 64-byte aligned (see _split)


@dataclass
class StepInputs:
    input_ids: torch.Tensor     # [T] (used by the first stage)
    positions: torch.Tensor     # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot of each new token
    query_start: torch.Tensor   # [B + 1] where each sequence's tokens start in the packed T
    seq_lens: torch.Tensor      # [B] keys of each sequence after this step (its new tokens included)
    block_tables: torch.Tensor  # [B, M]
    sample_index: torch.Tensor  # [B + P] the token rows to score: each sequence's last, then P prompt-logprob rows
    max_query_len: int          # host int: the most new tokens of any sequence (sizes kernel grids)
    query_lens: list[int]       # host ints, for the reference attention (no device sync)
    context_lens: list[int]     # host ints, likewise
    max_context: int | None = None  # the most keys of any sequence; None when not known (graph capture)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


class StepBuffers:
    """Device buffers for every step of one rank (see the module docstring)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device):
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, max_blocks_per_seq
        size = self._extent(max_tokens, max_seqs, max_blocks_per_seq, max_tokens)  # prompt-logprob rows <= tokens
        self.device = torch.device(device)
        pinned = self.device.type == "cuda"
        # two staging copies, so filling step n + 1 never races step n's copy still in flight
        self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self._copied = [None, None]
        self._turn = 0
        self.buffer = torch.zeros(size, dtype=torch.int32, device=self.device)

    @staticmethod
    def _sizes(t: int, b: int, w: int, p: int) -> list[int]:
        return [t, t, t, b + 1, b, b + p, b * w]

    @staticmethod
    def _split(buf: torch.Tensor, t: int, b: int, w: int, p: int = 0) -> list[torch.Tensor]:
        """The step's regions, packed from the buffer's start: the layout depends only on (t, b, w, p),
        so every decode step of one bucket (p = 0) finds its inputs at the same addresses. Each region
        starts on a 64-byte boundary: Triton compiles a kernel again for each new alignment of its
        pointer arguments, and regions packed end to end moved with every step's shape (a compile of
        about a second in the middle of serving, many times over in the first minutes)."""
        parts, at = [], 0
        for n in StepBuffers._sizes(t, b, w, p):
            parts.append(buf[at:at + n])
            at += -(-n // _ALIGN) * _ALIGN
        return [*parts[:6], parts[6].view(b, w)]

    @staticmethod
    def _extent(t: int, b: int, w: int, p: int) -> int:
        sizes = StepBuffers._sizes(t, b, w, p)
        return sum(-(-n // _ALIGN) * _ALIGN for n in sizes[:-1]) + sizes[-1]

    def view(self, num_tokens: int, num_seqs: int, width: int, plan=None, max_query_len: int = 1,
             prompt_rows: int = 0) -> StepInputs:
        """StepInputs over the device buffer for a step of this size."""
        r = self._split(self.buffer, num_tokens, num_seqs, width, prompt_rows)
        return StepInputs(r[0], r[1], r[2], r[3], r[4], r[6], r[5], max_query_len,
                          plan.query_lens.tolist() if plan is not None else [1] * num_seqs,
                          plan.context_lens.tolist() if plan is not None else [1] * num_seqs,
                          int(plan.context_lens.max()) if plan is not None and plan.context_lens.numel() else None)

    def fill(self, plan, pad_seqs_to: int | None = None, earlier_ids: torch.Tensor | None = None) -> StepInputs:
        """Copy `plan`'s indices to the device (one transfer) and return the step's views. With
        pad_seqs_to (decode plans only), rows past the plan's are one-token scratch sequences and
        block tables take the full width. earlier_ids: the previous plan's sampled ids on the device,
        which input ids -1 - r name (row r's), resolved here on the device without waiting. The plan's
        prompt_rows (none with pad_seqs_to) are scored after each sequence's last token."""
        t, b, m = plan.input_ids.numel(), plan.num_seqs, plan.block_tables.shape[1]
        rows = getattr(plan, "prompt_rows", None)
        p = 0 if rows is None else int(rows.numel())
        if p and pad_seqs_to:
            raise ValueError("a padded (decode graph) step scores no prompt rows")
        if t > self.max_tokens or b > self.max_seqs or m > self.width:
            raise ValueError(f"step of {t} tokens, {b} sequences, {m} blocks per sequence exceeds the "
                             f"engine's limits ({self.max_tokens}, {self.max_seqs}, {self.width})")
        padded = pad_seqs_to or b
        tokens = t + (padded - b)  # each padding row is one token
        width = self.width if pad_seqs_to else max(1, m)
        stage = self._staging[self._turn]
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        ids, pos, slots, starts, lens, sample, tables = self._split(stage, tokens, padded, width, p)
        for region, values in ((ids, plan.input_ids), (pos, plan.positions), (slots, plan.slot_mapping)):
            region[:t] = values
            region[t:] = 0
        starts[0] = 0
        starts[1:b + 1] = plan.query_lens.cumsum(0)
        starts[b + 1:] = t + torch.arange(1, padded - b + 1)
        lens[:b] = plan.context_lens
        lens[b:] = 1
        tables[:b, :m] = plan.block_tables
        tables[b:, 0] = 0
        sample[:padded] = starts[1:] - 1
        if p:
            sample[padded:] = rows
        n = self._extent(tokens, padded, width, p)
        self.buffer[:n].copy_(stage[:n], non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        self._turn ^= 1
        if earlier_ids is not None:
            ids = self.buffer[:t]
            named = (-1 - ids).clamp(0, earlier_ids.numel() - 1)
            ids.copy_(torch.where(ids < 0, earlier_ids.to(ids.dtype)[named], ids))
        max_q = int(plan.query_lens.max()) if b else 1
        return self.view(tokens, padded, width, plan, max_query_len=max(1, max_q), prompt_rows=p)

    def fill_scratch_prefill(self, query_lens: list[int]) -> StepInputs:
        """A prefill step of scratch sequences, every key in the scratch block 0 (to warm up the
        eager path: prompts and mixed steps)."""
        lens = torch.tensor(query_lens)
        t, b = int(lens.sum()), len(query_lens)
        plan = SimpleNamespace(input_ids=torch.zeros(t, dtype=torch.int64),
                               positions=torch.cat([torch.arange(n) for n in query_lens]),
                               slot_mapping=torch.zeros(t, dtype=torch.int64), query_lens=lens, context_lens=lens,
                               block_tables=torch.zeros(b, self.width, dtype=torch.int64), num_seqs=b)
        return self.fill(plan)

    def fill_scratch(self, num_seqs: int) -> StepInputs:
        """A decode step of `num_seqs` scratch rows only (to warm up and capture graphs)."""
        none = torch.zeros(0, dtype=torch.int64)
        empty = SimpleNamespace(input_ids=none, positions=none, slot_mapping=none, query_lens=none,
                                context_lens=none, block_tables=torch.zeros(0, 0, dtype=torch.int64), num_seqs=0)
        return self.fill(empty, pad_seqs_to=num_seqs)
