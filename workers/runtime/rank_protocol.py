"""What ranks say to each other, defined once: the step plan rank 0 sends every rank, the results the
sampling rank sends back, the hidden states a stage hands the next, their message tags, and the
bookkeeping of sends still in flight. Fixed-schema tensors only, never pickle.

Plan wire format over the gloo control group (or, for the ranks on rank 0's node, the same bytes
joined into one record of plan_ring's shared-memory ring): a header int64[15] = (kind, T, B, M, return_logits, L,
N, id, K, G, W, share_ids, P, NP, C), then one int64 payload and one float32 payload, the fields of StepPlan in
declaration order, each of the shape its `shape` metadata gives in terms of T tokens, B sequences, M
block-table width, L penalty-history width, K logit-bias entries, G grammar masks of W int64 words, P
prompt-logprob rows, C KV block copies (digits are fixed sizes; N: top logprobs wanted, -1 none; NP: the
same for the prompt rows; id: the plan's number in rank 0's sequence of plans).

Rank 0 sends each plan straight to every other rank with non-blocking point-to-point sends and
returns at once, so it can work on the plan (and schedule the next) while busy ranks have not taken
it yet; a rank takes plans in the order they were sent. A tree broadcast would make a rank that
relays wait for a busier one; a direct send never does. Hidden states and results use tags derived
from the plan's id (gloo matches on them; NCCL ignores them and relies on order, which is the same).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

RUN, SHUTDOWN = 0, 1
HEADER_LEN = 15
TAG_CYCLE = 1 << 12          # tags repeat every TAG_CYCLE plans
HIDDEN_TAG = 1 << 16         # hidden states of plan i: HIDDEN_TAG + i % TAG_CYCLE
RESULT_TAG = 1 << 20         # results of plan i: RESULT_TAG + (i % TAG_CYCLE) * RESULT_PARTS + part
RESULT_PARTS = 8
PLAN_TAG = 1 << 24           # plan messages


def _empty_shape(shape: str) -> tuple[int, ...]:
    return tuple(int(c) if c.isdigit() else 0 for c in shape)


def _int(shape: str, empty: bool = False):
    meta = {"shape": shape, "dtype": torch.int64}
    if empty:  # optional: absent from most plans
        return field(default_factory=lambda: torch.zeros(_empty_shape(shape), dtype=torch.int64), metadata=meta)
    return field(metadata=meta)


def _float(shape: str, empty: bool = False):
    meta = {"shape": shape, "dtype": torch.float32}
    if empty:
        return field(default_factory=lambda: torch.zeros(_empty_shape(shape), dtype=torch.float32), metadata=meta)
    return field(metadata=meta)


@dataclass
class StepPlan:
    input_ids: torch.Tensor = _int("T")
    positions: torch.Tensor = _int("T")
    slot_mapping: torch.Tensor = _int("T")
    query_lens: torch.Tensor = _int("B")
    context_lens: torch.Tensor = _int("B")     # tokens cached for the sequence after this step
    block_tables: torch.Tensor = _int("BM")
    top_k: torch.Tensor = _int("B")            # 0 = off
    sample_seed: torch.Tensor = _int("B")
    history: torch.Tensor = _int("BL")         # prompt + output ids for penalties, -1 padded (L may be 0)
    output_start: torch.Tensor = _int("B")     # where output ids begin in history
    temperature: torch.Tensor = _float("B")    # 0 = greedy
    top_p: torch.Tensor = _float("B")
    min_p: torch.Tensor = _float("B")
    presence_penalty: torch.Tensor = _float("B")
    frequency_penalty: torch.Tensor = _float("B")
    repetition_penalty: torch.Tensor = _float("B")
    bias_rows: torch.Tensor = _int("K", empty=True)     # logit_bias entries: row, token id, bias
    bias_ids: torch.Tensor = _int("K", empty=True)
    bias_values: torch.Tensor = _float("K", empty=True)
    mask_rows: torch.Tensor = _int("G", empty=True)     # the rows whose tokens a grammar restricts
    token_mask: torch.Tensor = _int("GW", empty=True)   # their allowed tokens: int32 bit words, in pairs
    # prompt log-probabilities: the token rows (indices into the T tokens) whose next-token distribution
    # is scored, and the prompt token that follows each; the last stage returns their log-probabilities
    prompt_rows: torch.Tensor = _int("P", empty=True)
    prompt_targets: torch.Tensor = _int("P", empty=True)
    # (source, destination) KV blocks each rank copies, every layer of its own, K and V, before the
    # step's forward pass (sources are read before any destination is written): the private copy a
    # sequence takes of a block it shared (a forked prompt's partial last block) before writing to it
    copy_blocks: torch.Tensor = _int("C2", empty=True)
    return_logits: bool = False
    num_logprobs: int = -1       # top alternatives to return per sequence; -1 = no logprobs
    num_prompt_logprobs: int = -1  # top alternatives to return per prompt row (with any prompt_rows)
    # the sampled ids stay on the device of every first-stage rank (one stage only), where the next
    # plan may name them: an input id -1 - r stands for row r's id sampled by this plan
    share_ids: bool = False
    kind: int = RUN
    step_id: int = 0             # rank 0 numbers its plans; tags the step's point-to-point messages

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.numel())

    @property
    def num_prompt_rows(self) -> int:
        return int(self.prompt_rows.numel())


_TENSORS = [f for f in fields(StepPlan) if "shape" in f.metadata]


def _shape(kind: str, dims: dict) -> tuple[int, ...]:
    return tuple(int(c) if c.isdigit() else dims[c] for c in kind)


def shutdown_plan() -> StepPlan:
    dims = dict.fromkeys("TBMLKGWPC", 0)
    return StepPlan(**{f.name: torch.zeros(_shape(f.metadata["shape"], dims), dtype=f.metadata["dtype"])
                       for f in _TENSORS}, kind=SHUTDOWN)


def _encode(plan: StepPlan) -> list[torch.Tensor]:
    header = torch.tensor([plan.kind, plan.input_ids.numel(), plan.num_seqs, plan.block_tables.shape[1],
                           int(plan.return_logits), plan.history.shape[1], plan.num_logprobs, plan.step_id,
                           plan.bias_rows.numel(), plan.token_mask.shape[0], plan.token_mask.shape[1],
                           int(plan.share_ids), plan.prompt_rows.numel(), plan.num_prompt_logprobs,
                           plan.copy_blocks.shape[0]],
                          dtype=torch.int64)
    payloads = [torch.cat([getattr(plan, f.name).reshape(-1).to(dt) for f in _TENSORS
                           if f.metadata["dtype"] == dt]) for dt in (torch.int64, torch.float32)]
    return [header, *payloads]


class SendQueue:
    """Non-blocking sends whose tensors must stay alive until they complete: completed ones are
    forgotten as new ones come, and past `cap` the oldest is waited for."""

    def __init__(self, cap: int = 64):
        self.cap, self._items = cap, deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, works: list, tensors) -> None:
        self._items.append((works, tensors))
        self.retire()

    def retire(self, wait_all: bool = False) -> None:
        while self._items and (wait_all or len(self._items) > self.cap
                               or all(w.is_completed() for w in self._items[0][0])):
            for w in self._items.popleft()[0]:
                w.wait()


plan_sends = SendQueue()     # rank 0: plans whose sends may still be in progress


def broadcast_plan(plan: StepPlan | None, group, src: int = 0, ring=None) -> StepPlan:
    """Rank `src` passes its plan and returns once its sends are posted (a SHUTDOWN plan returns
    once every earlier plan and itself were delivered); every other rank passes None and gets the
    next plan back. ring: this rank's plan_ring.PlanRing (rank `src` writes it, the ranks of its node
    read it), or None: gloo point-to-point."""
    if plan is not None:
        parts = _encode(plan)
        by_ring = set(ring.readers) if ring is not None and ring.publish(_joined(parts)) else set()
        plan_sends.add([dist.isend(t, dst, group=group, tag=PLAN_TAG)
                        for dst in range(dist.get_world_size(group)) if dst != src and dst not in by_ring
                        for t in parts if t.numel()], parts)
        plan_sends.retire(wait_all=plan.kind == SHUTDOWN)  # (the ring's readers keep their mapping: no wait)
        return plan
    data = ring.take() if ring is not None else None
    if data is not None:
        cursor = _Cursor(data)
        return _decode(cursor.take(torch.int64, HEADER_LEN).tolist(), cursor.take)
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.recv(header, src, group=group, tag=PLAN_TAG)
    return _decode(header.tolist(), lambda dt, n: _received(dt, n, src, group))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The header and payloads as one byte string (the ring's format)."""
    return torch.cat([p.reshape(-1).view(torch.uint8) for p in parts])


class _Cursor:
    """Typed runs, one after another, out of a byte string."""

    def __init__(self, data: torch.Tensor):
        self.data, self.at = data, 0

    def take(self, dt: torch.dtype, n: int) -> torch.Tensor:
        size = n * dt.itemsize
        part = self.data[self.at: self.at + size].view(dt)
        self.at += size
        return part


def _received(dt: torch.dtype, n: int, src: int, group) -> torch.Tensor:
    buf = torch.empty(n, dtype=dt)
    if n:
        dist.recv(buf, src, group=group, tag=PLAN_TAG)
    return buf


def _decode(header: list[int], payload) -> StepPlan:
    """The plan of `header`; payload(dtype, count) gives the next payload of that type."""
    kind, t, b, m, want, hl, nlp, step_id, k, g, w, share, p, nplp, c = header
    dims = {"T": t, "B": b, "M": m, "L": hl, "K": k, "G": g, "W": w, "P": p, "C": c}
    values = {}
    for dt in (torch.int64, torch.float32):
        mine = [f for f in _TENSORS if f.metadata["dtype"] == dt]
        shapes = [_shape(f.metadata["shape"], dims) for f in mine]
        sizes = [torch.Size(s).numel() for s in shapes]
        buf = payload(dt, sum(sizes))
        for f, s, part in zip(mine, shapes, buf.split(sizes), strict=True):
            values[f.name] = part.view(s)
    return StepPlan(**values, return_logits=bool(want), num_logprobs=nlp, num_prompt_logprobs=nplp, kind=kind,
                    step_id=step_id, share_ids=bool(share))


def hidden_tag(step_id: int) -> int:
    return HIDDEN_TAG + step_id % TAG_CYCLE


def send_hidden(hidden: torch.Tensor, dst: int, step_id: int = 0):
    """Post the send; returns (handle, tensor sent), the tensor to keep alive until the handle completes."""
    buf = hidden.contiguous()
    return dist.isend(buf, dst, tag=hidden_tag(step_id)), buf


def recv_hidden(num_tokens: int, hidden_size: int, dtype: torch.dtype, device, src: int,
                step_id: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Receive into `out` when given (a graph's fixed input), else into a new tensor."""
    buf = torch.empty((num_tokens, hidden_size), dtype=dtype, device=device) if out is None else out
    dist.recv(buf, src, tag=hidden_tag(step_id))
    return buf


@dataclass
class StepResult:
    """What rank 0 gets back from a step (host tensors)."""
    ids: torch.Tensor                      # int64 [B] sampled token ids
    logprobs: torch.Tensor | None = None   # float32 [B, 1 + N]: chosen token, then the top N
    top_ids: torch.Tensor | None = None    # int64 [B, N]
    logits: torch.Tensor | None = None     # float32 [B, V], only when the plan asked
    prompt_logprobs: torch.Tensor | None = None  # float32 [P, 1 + NP]: each prompt row's next prompt token,
    prompt_top_ids: torch.Tensor | None = None   # then the top NP; int64 [P, NP] (only with prompt rows)


def result_tag(step_id: int, part: int) -> int:
    """Tag of result part `part` (ids, logprobs, top ids, logits, prompt logprobs, prompt top ids: those
    the plan asks for, in this order) of plan `step_id`."""
    return RESULT_TAG + (step_id % TAG_CYCLE) * RESULT_PARTS + part


def result_shapes(plan: StepPlan, vocab_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    b, n = plan.num_seqs, plan.num_logprobs
    shapes = [((b,), torch.int64)]
    if n >= 0:
        shapes += [((b, 1 + n), torch.float32), ((b, n), torch.int64)]
    if plan.return_logits:
        shapes.append(((b, vocab_size), torch.float32))
    p, np_ = plan.num_prompt_rows, max(0, plan.num_prompt_logprobs)
    if p:
        shapes += [((p, 1 + np_), torch.float32), ((p, np_), torch.int64)]
    return shapes


class PendingResult:
    """A step's result on its way to rank 0: its receives (or device copies) are posted, or its
    parts already here."""

    def __init__(self, plan: StepPlan, parts: list[torch.Tensor], works=()):
        self.plan, self.parts, self.works = plan, parts, list(works)

    def ready(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> StepResult:
        for w in self.works:
            w.wait()
        self.works = []
        parts = list(self.parts)
        result = StepResult(parts.pop(0))
        if self.plan.num_logprobs >= 0:
            result.logprobs, result.top_ids = parts.pop(0), parts.pop(0)
        if self.plan.return_logits:
            result.logits = parts.pop(0)
        if self.plan.num_prompt_rows:
            result.prompt_logprobs, result.prompt_top_ids = parts.pop(0), parts.pop(0)
        return result
