"""StepPlan: what every rank runs next, as fixed-schema tensors sent from rank 0 (never pickle).

Wire format over the gloo control group: a header int64[8] = (kind, T, B, M, return_logits, L, N, id),
then one int64 payload and one float32 payload whose lengths follow from the header. T tokens, B
sequences, M block-table width, L penalty-history width, N top logprobs wanted (-1: no logprobs),
id the plan's number in rank 0's sequence of plans.

Rank 0 sends each plan straight to every other rank with non-blocking point-to-point sends and
returns at once, so it can work on the plan (and schedule the next) while busy ranks have not taken
it yet; a rank takes plans in the order they were sent. A tree broadcast would make a rank that
relays wait for a busier one; a direct send never does.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

RUN, SHUTDOWN = 0, 1
HEADER_LEN = 8
PLAN_TAG = 1 << 24           # point-to-point tag of plan messages (results and hidden states use others)
_MAX_PENDING_PLANS = 64      # rank 0 waits for old sends beyond this many plans


@dataclass
class StepPlan:
    input_ids: torch.Tensor      # int64 [T]
    positions: torch.Tensor      # int64 [T]
    slot_mapping: torch.Tensor   # int64 [T]
    query_lens: torch.Tensor     # int64 [B]
    context_lens: torch.Tensor   # int64 [B]
    block_tables: torch.Tensor   # int64 [B, M]
    top_k: torch.Tensor          # int64 [B], 0 = off
    sample_seed: torch.Tensor    # int64 [B]
    history: torch.Tensor        # int64 [B, L]: prompt + output ids for penalties, -1 padded (L may be 0)
    output_start: torch.Tensor   # int64 [B]: where output ids begin in history
    temperature: torch.Tensor    # float32 [B], 0 = greedy
    top_p: torch.Tensor          # float32 [B]
    min_p: torch.Tensor          # float32 [B]
    presence_penalty: torch.Tensor   # float32 [B]
    frequency_penalty: torch.Tensor  # float32 [B]
    repetition_penalty: torch.Tensor  # float32 [B]
    return_logits: bool = False
    num_logprobs: int = -1       # top alternatives to return per sequence; -1 = no logprobs
    kind: int = RUN
    step_id: int = 0             # rank 0 numbers its plans; tags the step's point-to-point messages

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.numel())


_INT_FIELDS = ("input_ids", "positions", "slot_mapping", "query_lens", "context_lens", "block_tables",
               "top_k", "sample_seed", "history", "output_start")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")

# rank 0: (send handles, tensors they read) of plans whose sends may still be in progress
_pending: deque = deque()


def shutdown_plan() -> StepPlan:
    empty = {f.name: torch.zeros(0, dtype=torch.int64) for f in fields(StepPlan) if f.name in _INT_FIELDS}
    empty["block_tables"] = empty["history"] = torch.zeros(0, 0, dtype=torch.int64)
    return StepPlan(**empty, **{f: torch.zeros(0) for f in _FLOAT_FIELDS}, kind=SHUTDOWN)


def _encode(plan: StepPlan) -> list[torch.Tensor]:
    header = torch.tensor([plan.kind, plan.input_ids.numel(), plan.num_seqs, plan.block_tables.shape[1],
                           int(plan.return_logits), plan.history.shape[1], plan.num_logprobs, plan.step_id],
                          dtype=torch.int64)
    ints = torch.cat([getattr(plan, f).reshape(-1).to(torch.int64) for f in _INT_FIELDS])
    floats = torch.cat([getattr(plan, f).reshape(-1).float() for f in _FLOAT_FIELDS])
    return [header, ints, floats]


def _retire(wait_all: bool) -> None:
    """Forget plans whose sends completed; wait for all of them (or the oldest beyond the cap)."""
    while _pending and (wait_all or len(_pending) > _MAX_PENDING_PLANS
                        or all(w.is_completed() for w in _pending[0][0])):
        for w in _pending.popleft()[0]:
            w.wait()


def broadcast_plan(plan: StepPlan | None, group, src: int = 0) -> StepPlan:
    """Rank `src` passes its plan and returns once its sends are posted (a SHUTDOWN plan returns
    once every earlier plan and itself were delivered); every other rank passes None and gets the
    next plan back."""
    if plan is not None:
        parts = _encode(plan)
        works = [dist.isend(t, dst, group=group, tag=PLAN_TAG)
                 for dst in range(dist.get_world_size(group)) if dst != src for t in parts if t.numel()]
        _pending.append((works, parts))
        _retire(wait_all=plan.kind == SHUTDOWN)
        return plan
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.recv(header, src, group=group, tag=PLAN_TAG)
    kind, t, b, m, want, hl, nlp, step_id = header.tolist()
    sizes = [t, t, t, b, b, b * m, b, b, b * hl, b]
    ints = torch.empty(sum(sizes), dtype=torch.int64)
    floats = torch.empty(len(_FLOAT_FIELDS) * b, dtype=torch.float32)
    for buf in (ints, floats):
        if buf.numel():
            dist.recv(buf, src, group=group, tag=PLAN_TAG)
    parts = dict(zip(_INT_FIELDS, ints.split(sizes)))
    parts["block_tables"] = parts["block_tables"].view(b, m)
    parts["history"] = parts["history"].view(b, hl)
    parts.update(zip(_FLOAT_FIELDS, floats.view(len(_FLOAT_FIELDS), b).unbind(0)))
    return StepPlan(**parts, return_logits=bool(want), num_logprobs=nlp, kind=kind, step_id=step_id)
