"""CUDA graphs of this rank's stage for decode steps, one per batch-size bucket (1, 2, 4, ... up to
the engine's max batch), captured at start-up from one memory pool, largest first.

A decode step of B sequences runs the graph of the smallest bucket >= B, its extra rows padded with
scratch sequences (see StepBuffers). A graph reads its inputs from the fixed addresses StepBuffers
gives a step of that size, and (past the first stage) the hidden states from a fixed receive buffer;
its TP all-reduces and the all-gather of the vocabulary are captured with it.
"""
from __future__ import annotations

import time

import torch


def bucket_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, buffers, cos, sin, cache, hidden_size: int, dtype, first_stage: bool,
                 max_batch: int):
        self.model, self.buffers, self.cos, self.sin, self.cache = model, buffers, cos, sin, cache
        self.buckets = bucket_sizes(max_batch)
        self.hidden_in = None if first_stage else torch.zeros(max_batch, hidden_size, dtype=dtype,
                                                              device=buffers.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool_bytes = 0
        self.capture_s = 0.0

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def hidden_buffer(self, bucket: int) -> torch.Tensor | None:
        return None if self.hidden_in is None else self.hidden_in[:bucket]

    def _forward(self, bucket: int):
        step = self.buffers.view(bucket, bucket, self.buffers.width)
        return self.model(self.hidden_buffer(bucket), step, self.cos, self.sin, self.cache)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize(self.buffers.device)
        torch.cuda.empty_cache()  # as the capture does: the difference is then the graphs' own memory
        free_before, _ = torch.cuda.mem_get_info(self.buffers.device)
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self.buffers.fill_scratch(bucket)
            self._forward(bucket)  # compiles kernels and creates communicators outside the capture
            torch.cuda.synchronize(self.buffers.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bucket)
            self.graphs[bucket] = (graph, out)
        torch.cuda.synchronize(self.buffers.device)
        torch.cuda.empty_cache()
        self.pool_bytes = free_before - torch.cuda.mem_get_info(self.buffers.device)[0]
        self.capture_s = time.perf_counter() - start

    def replay(self, bucket: int) -> torch.Tensor:
        """Run the bucket's graph on the inputs already in place; its (static) output."""
        graph, out = self.graphs[bucket]
        graph.replay()
        return out
