"""StepPlan: what every rank runs next, as fixed-schema tensors broadcast from rank 0 (never pickle).

Wire format over the gloo control group: a header int64[8] = (kind, T, B, M, return_logits, 0, 0, 0),
then one int64 payload and one float32 payload whose lengths follow from the header.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    temperature: torch.Tensor    # float32 [B], 0 = greedy
    top_p: torch.Tensor          # float32 [B]
    return_logits: bool = False
    kind: int = RUN

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.numel())


def shutdown_plan() -> StepPlan:
    empty = torch.zeros(0, dtype=torch.int64)
    f = torch.zeros(0, dtype=torch.float32)
    return StepPlan(empty, empty, empty, empty, empty, torch.zeros(0, 0, dtype=torch.int64), empty, empty,
                    f, f, kind=SHUTDOWN)


_INT_FIELDS = ("input_ids", "positions", "slot_mapping", "query_lens", "context_lens", "block_tables",
               "top_k", "sample_seed")


def broadcast_plan(plan: StepPlan | None, group, src: int = 0) -> StepPlan:
    """Rank `src` passes its plan; every other rank passes None and gets the same plan back."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    if plan is not None:
        t, b, m = plan.input_ids.numel(), plan.num_seqs, plan.block_tables.shape[1]
        header[:5] = torch.tensor([plan.kind, t, b, m, int(plan.return_logits)])
    dist.broadcast(header, src, group=group)
    kind, t, b, m, want = header[:5].tolist()
    sizes = [t, t, t, b, b, b * m, b, b]
    if plan is not None:
        ints = torch.cat([getattr(plan, f).reshape(-1) for f in _INT_FIELDS])
        floats = torch.cat([plan.temperature, plan.top_p]).float()
    else:
        ints = torch.empty(sum(sizes), dtype=torch.int64)
        floats = torch.empty(2 * b, dtype=torch.float32)
    if ints.numel():
        dist.broadcast(ints, src, group=group)
    if floats.numel():
        dist.broadcast(floats, src, group=group)
    if plan is not None:
        return plan
    parts = dict(zip(_INT_FIELDS, ints.split(sizes)))
    parts["block_tables"] = parts["block_tables"].view(b, m)
    temperature, top_p = floats.split([b, b])
    return StepPlan(**parts, temperature=temperature, top_p=top_p, return_logits=bool(want), kind=kind)
