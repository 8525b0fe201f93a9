"""StepPlan: what every rank runs next, as fixed-schema tensors broadcast from rank 0 (never pickle).

Wire format over the gloo control group: a header int64[8] = (kind, T, B, M, return_logits, L, N, 0),
then one int64 payload and one float32 payload whose lengths follow from the header. T tokens, B
sequences, M block-table width, L penalty-history width, N top logprobs wanted (-1: no logprobs).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

RUN, SHUTDOWN = 0, 1
HEADER_LEN = 8


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

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.numel())


_INT_FIELDS = ("input_ids", "positions", "slot_mapping", "query_lens", "context_lens", "block_tables",
               "top_k", "sample_seed", "history", "output_start")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def shutdown_plan() -> StepPlan:
    empty = {f.name: torch.zeros(0, dtype=torch.int64) for f in fields(StepPlan) if f.name in _INT_FIELDS}
    empty["block_tables"] = empty["history"] = torch.zeros(0, 0, dtype=torch.int64)
    return StepPlan(**empty, **{f: torch.zeros(0) for f in _FLOAT_FIELDS}, kind=SHUTDOWN)


def broadcast_plan(plan: StepPlan | None, group, src: int = 0) -> StepPlan:
    """Rank `src` passes its plan; every other rank passes None and gets the same plan back."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    if plan is not None:
        header[:7] = torch.tensor([plan.kind, plan.input_ids.numel(), plan.num_seqs, plan.block_tables.shape[1],
                                   int(plan.return_logits), plan.history.shape[1], plan.num_logprobs])
    dist.broadcast(header, src, group=group)
    kind, t, b, m, want, hl, nlp = header[:7].tolist()
    sizes = [t, t, t, b, b, b * m, b, b, b * hl, b]
    if plan is not None:
        ints = torch.cat([getattr(plan, f).reshape(-1) for f in _INT_FIELDS])
        floats = torch.cat([getattr(plan, f).reshape(-1) for f in _FLOAT_FIELDS]).float()
    else:
        ints = torch.empty(sum(sizes), dtype=torch.int64)
        floats = torch.empty(len(_FLOAT_FIELDS) * b, dtype=torch.float32)
    if ints.numel():
        dist.broadcast(ints, src, group=group)
    if floats.numel():
        dist.broadcast(floats, src, group=group)
    if plan is not None:
        return plan
    parts = dict(zip(_INT_FIELDS, ints.split(sizes)))
    parts["block_tables"] = parts["block_tables"].view(b, m)
    parts["history"] = parts["history"].view(b, hl)
    parts.update(zip(_FLOAT_FIELDS, floats.view(len(_FLOAT_FIELDS), b).unbind(0)))
    return StepPlan(**parts, return_logits=bool(want), num_logprobs=nlp, kind=kind)
