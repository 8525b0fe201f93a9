"""One rank's share of a step: receive or embed, run this stage's layers, pass on or sample.

`launch` never waits on a later stage: hidden states leave through non-blocking sends, and on rank 0
the receives of the step's results are posted before the stage runs, so rank 0 can go on with the
next micro-batch and collect the result (PendingResult.wait) when it needs it."""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from meshserve.workers.engine_files import TORCH_DTYPES, EngineMeta, load_rank_weights
from meshserve.workers.engine_layout import kv_heads_of, stage_layers
from meshserve.workers.runtime.decode_graphs import DecodeGraphs
from meshserve.workers.runtime.kernel_ops import select_ops
from meshserve.workers.runtime.kv_cache import KVCache
from meshserve.workers.runtime.kv_sizing import agree_on_blocks, prompt_rows_per_step
from meshserve.workers.runtime.llama_shard import LlamaStage
from meshserve.workers.runtime.mesh import Mesh
from meshserve.workers.runtime.rank_protocol import (PendingResult, SendQueue, StepPlan, StepResult, recv_hidden,
                                                     result_shapes, result_tag, send_hidden)
from meshserve.workers.runtime.rope import rope_tables
from meshserve.workers.runtime.sampler import (apply_logit_bias, apply_penalties, apply_token_mask, logprobs_of,
                                              sample, to_device)
from meshserve.workers.runtime.step_inputs import StepBuffers, StepInputs
from meshserve.workers.runtime.tp_comm import tp_comm


class StepRunner:
    """This rank's stage with its KV cache, input buffers and (on GPU) decode graphs; `launch` runs a
    plan's share on it."""

    def __init__(self, meta: EngineMeta, mesh: Mesh):
        start = time.perf_counter()
        self.meta, self.mesh = meta, mesh
        spec = meta.spec
        self.dtype = TORCH_DTYPES[meta.dtype]
        weights = load_rank_weights(meta, mesh.rank, mesh.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.num_layers = len(stage_layers(spec.num_layers, mesh.pp, mesh.pp_stage))
        self.kv_heads = len(kv_heads_of(spec, mesh.tp, mesh.tp_rank))
        self.model = LlamaStage(spec, weights, self.num_layers, spec.num_heads // mesh.tp, self.kv_heads,
                                tp_comm(mesh, self.dtype), mesh.is_first_stage, mesh.is_last_stage,
                                select_ops(mesh.device))
        del weights
        self.cos, self.sin = rope_tables(spec.head_dim, spec.rope_theta, spec.rope_scaling,
                                         meta.max_seq_len, mesh.device)
        self.num_blocks = agree_on_blocks(meta, mesh, self.num_layers, self.kv_heads, self.dtype,
                                          meta.gpu_memory_fraction)
        self.prompt_rows_per_step = prompt_rows_per_step(meta, mesh.tp, self.dtype)  # (the scheduler's cap)
        self.cache = KVCache(self.num_layers, self.num_blocks, meta.kv_block_size, self.kv_heads,
                             spec.head_dim, self.dtype, mesh.device)
        self.buffers = StepBuffers(meta.max_num_tokens, meta.max_batch_size,
                                   -(-meta.max_seq_len // meta.kv_block_size), mesh.device)
        self.graphs = None
        if mesh.device.type == "cuda":
            self._warm_up_eager()
        if mesh.device.type == "cuda" and os.environ.get("MESHSERVE_CUDA_GRAPHS", "1") != "0":
            self.graphs = DecodeGraphs(self.model, self.buffers, self.cos, self.sin, self.cache, spec.hidden_size,
                                       self.dtype, mesh.is_first_stage, meta.max_batch_size)
            self.graphs.capture()
        self._sends = SendQueue()  # hidden-state sends that may be in flight
        self._shared_ids: torch.Tensor | None = None  # the last share_ids plan's sampled ids (on the device)
        self.idle_meter = None  # an IdleMeter, set by the bench on a GPU rank 0 that samples
        self._deferred = None   # (plan, logits) of a launch whose sampling waits for its masks
        if mesh.device.type == "cuda" and mesh.rank == 0:
            gib = 2 ** 30
            graphs = (f"decode graphs for batch {self.graphs.buckets[0]}..{self.graphs.buckets[-1]} "
                      f"({len(self.graphs.buckets)}) {self.graphs.pool_bytes / gib:.2f} GiB in "
                      f"{self.graphs.capture_s:.1f} s" if self.graphs else "no CUDA graphs")
            print(f"meshserve: rank 0: weights {weight_bytes / gib:.2f} GiB, KV cache {self.cache.nbytes / gib:.2f} "
                  f"GiB ({self.num_blocks} blocks, {(self.num_blocks - 1) * meta.kv_block_size} tokens at most "
                  f"in flight), {graphs}; ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    @torch.inference_mode()
    def _warm_up_eager(self) -> None:
        """Run the eager path (prompts, mixed steps, sampling) once on scratch sequences, every rank of
        the stage alike (its TP collectives run too): Triton compiles those kernels now, at start-up,
        and not in the middle of serving, where each compile would stall every request for a second."""
        from meshserve.workers.runtime.sampler import argmax_rows
        cap = self.meta.max_num_tokens
        short = [min(3, cap - 1), 1] if self.meta.max_batch_size > 1 and cap > 1 else [min(3, cap)]
        longest = max(1, min(64, cap - 4, self.meta.max_seq_len))
        for query_lens in (short, [longest]):  # short rows (small tiles, gemv) and a prompt (large tiles)
            step = self.buffers.fill_scratch_prefill(query_lens)
            hidden = None if self.mesh.is_first_stage else torch.zeros(
                step.num_tokens, self.meta.spec.hidden_size, dtype=self.dtype, device=self.mesh.device)
            out = self.model(hidden, step, self.cos, self.sin, self.cache)
            if self.mesh.is_last_stage:
                argmax_rows(out)
        if self.mesh.device.type == "cuda":
            torch.cuda.synchronize(self.mesh.device)

    def _inputs(self, plan: StepPlan) -> tuple[StepInputs, int | None]:
        """The step's device inputs, and the graph bucket that runs it (None: run eagerly)."""
        bucket = None
        if (self.graphs is not None and plan.input_ids.numel() == plan.num_seqs and not plan.num_prompt_rows
                and plan.num_seqs and int(plan.query_lens.max()) == 1):  # (a fork row feeds no token)
            bucket = self.graphs.bucket_for(plan.num_seqs)
        earlier = None
        if self.mesh.is_first_stage and plan.input_ids.numel() and int(plan.input_ids.min()) < 0:
            if self._shared_ids is None:
                raise RuntimeError(f"plan {plan.step_id} names sampled ids of a plan that shared none")
            earlier = self._shared_ids
        return self.buffers.fill(plan, pad_seqs_to=bucket, earlier_ids=earlier), bucket

    @torch.inference_mode()
    def launch(self, plan: StepPlan, defer_sampling: bool = False) -> PendingResult | None:
        """Run this rank's share of `plan` without waiting for later stages. On rank 0 returns the
        PendingResult to wait on; elsewhere None. Hidden states leave through non-blocking sends.
        defer_sampling (rank 0 when it samples): stop before sampling and return None; the plan's
        grammar masks, known only once the step before it has finished, come to sample_deferred,
        which samples while the forward pass may still be running."""
        mesh = self.mesh
        if self.idle_meter is not None:
            self.idle_meter.step_started()
        if plan.copy_blocks.numel():  # before this stage's forward pass (and outside any decode graph)
            self.cache.copy_blocks(plan.copy_blocks)
        step, bucket = self._inputs(plan)
        pending = None
        if mesh.rank == 0 and mesh.sampler_rank != 0:  # post the receives first: the sampler never waits
            pending = self._post_result_recvs(plan)
        hidden = None
        if not mesh.is_first_stage:
            hidden = recv_hidden(step.num_tokens, self.meta.spec.hidden_size, self.dtype, mesh.device,
                                 mesh.stage_rank(mesh.pp_stage - 1), plan.step_id,
                                 out=self.graphs.hidden_buffer(bucket) if bucket else None)
        if bucket:
            out = self.graphs.replay(bucket)
        else:
            out = self.model(hidden, step, self.cos, self.sin, self.cache)
        if mesh.is_last_stage and out.shape[0] != plan.num_seqs + plan.num_prompt_rows:
            out = out[: plan.num_seqs]  # the bucket's padding rows
        if not mesh.is_last_stage:  # a graph's output is overwritten by its next replay: send a copy
            self._keep(send_hidden(out.clone() if bucket else out, mesh.stage_rank(mesh.pp_stage + 1), plan.step_id))
            return pending
        if mesh.rank != mesh.sampler_rank:
            if plan.share_ids:
                self._share_ids(plan, None)
            return pending
        if defer_sampling:
            if mesh.rank != 0:
                raise RuntimeError("only rank 0, when it samples, defers sampling")
            self._deferred = (plan, out)
            return None
        return self._finish(plan, out, pending)

    @torch.inference_mode()
    def sample_deferred(self, mask_rows: torch.Tensor, token_mask: torch.Tensor) -> PendingResult:
        """Sample the deferred plan with its grammar masks (rows, packed bits: as StepPlan holds them)."""
        (plan, out), self._deferred = self._deferred, None
        plan.mask_rows, plan.token_mask = mask_rows, token_mask
        return self._finish(plan, out, None)

    def _finish(self, plan: StepPlan, out: torch.Tensor, pending) -> PendingResult | None:
        """On the sampling rank: sample, share the ids, and send (or, on rank 0, keep) the results."""
        mesh = self.mesh
        parts = self._sample(plan, out)
        if plan.share_ids:
            self._share_ids(plan, parts[0])
        if mesh.rank == 0:
            result = PendingResult(plan, *_to_host(parts))
            if self.idle_meter is not None:
                self.idle_meter.step_ended()
            return result
        for i, p in enumerate(parts):
            dist.send(p.cpu().contiguous(), 0, group=mesh.control_group, tag=result_tag(plan.step_id, i))
        return pending

    def _share_ids(self, plan: StepPlan, ids: torch.Tensor | None) -> None:
        """Keep the plan's sampled ids on the device, for the next plan to name; the sampler's go to
        the other ranks of its TP group (share_ids plans have one stage: that is every rank)."""
        if self.mesh.tp > 1:
            if ids is None:
                ids = torch.empty(plan.num_seqs, dtype=torch.int64, device=self.mesh.device)
            dist.broadcast(ids, self.mesh.sampler_rank, group=self.mesh.tp_group)
        self._shared_ids = ids

    def run(self, plan: StepPlan) -> StepResult | None:
        """Run `plan` to the end: the StepResult on rank 0, None elsewhere."""
        pending = self.launch(plan)
        return pending.wait() if pending is not None else None

    def flush(self) -> None:
        """Wait until every hidden-state send of this rank has completed."""
        self._sends.retire(wait_all=True)

    def release(self, wait: bool = True) -> None:
        """Drop the decode graphs before the mesh is left: NCCL work captured in a graph holds its
        communicator, and tearing the process group down under a live graph hangs. A graph still
        running is freed by CUDA when it completes; `wait` (not after a failure, when a peer may be
        gone) first lets this rank's sends finish."""
        if wait:
            self.flush()
        if self.graphs is not None:
            self.graphs.graphs.clear()
            self.graphs = None

    def _keep(self, send) -> None:
        handle, tensor = send
        self._sends.add([handle], tensor)

    def _post_result_recvs(self, plan: StepPlan) -> PendingResult:
        parts = [torch.empty(shape, dtype=dtype) for shape, dtype in result_shapes(plan, self.meta.spec.vocab_size)]
        works = [dist.irecv(p, self.mesh.sampler_rank, group=self.mesh.control_group,
                            tag=result_tag(plan.step_id, i)) for i, p in enumerate(parts)]
        return PendingResult(plan, parts, works)

    def _sample(self, plan: StepPlan, logits) -> list[torch.Tensor]:
        """On the sampler rank: sampled ids, then logprobs and top ids, then logits, then the prompt
        rows' logprobs and top ids, as asked (on the device). logits: [B + P], the prompt rows last."""
        rows = None
        if plan.num_prompt_rows:
            rows, logits = logits[plan.num_seqs:], logits[: plan.num_seqs]
        processed = apply_penalties(logits, plan.history, plan.output_start, plan.presence_penalty,
                                    plan.frequency_penalty, plan.repetition_penalty)
        processed = apply_logit_bias(processed, plan.bias_rows, plan.bias_ids, plan.bias_values)
        processed = apply_token_mask(processed, plan.mask_rows, plan.token_mask)
        ids = sample(processed, plan.temperature, plan.top_k, plan.top_p, plan.sample_seed, plan.min_p)
        parts = [ids]
        if plan.num_logprobs >= 0:
            parts += list(logprobs_of(logits, ids, plan.num_logprobs))
        if plan.return_logits:
            parts.append(logits)
        if rows is not None:
            targets = to_device(plan.prompt_targets, rows.device)
            parts += list(logprobs_of(rows, targets, max(0, plan.num_prompt_logprobs)))
        return parts


class _CopyDone:
    """Completion of device-to-host copies (an event after them), waited on like a receive."""

    def __init__(self):
        self.event = torch.cuda.Event()
        self.event.record()

    def is_completed(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


def _to_host(parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
    """Host copies of `parts` and what to wait on before reading them: on GPU the copies go to
    pinned memory without blocking, so rank 0 can prepare the next step while this one runs."""
    if not parts or parts[0].device.type != "cuda":
        return [p.cpu() for p in parts], []
    host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in parts]
    for h, p in zip(host, parts):
        h.copy_(p, non_blocking=True)
    return host, [_CopyDone()]
