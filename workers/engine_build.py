"""`meshserve build`: shard a checkpoint into per-rank TensorRT-LLM checkpoint files.

Each rank file is written by its own process from only the slices it needs; the engine appears
under its final name only when every file is complete.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from orchestrator.config import EngineConfig, ParallelConfig
from orchestrator.errors import UserError
from workers.checkpoint_source import open_source
from workers.engine_files import ENGINE_FORMAT, TORCH_DTYPES
from workers.engine_layout import Piece, rank_tensors
from workers.safetensors_io import StreamingWriter

_CHUNK_BYTES = 32 << 20  # rows read, converted and written at a time


@dataclass
class BuildReport:
    out_dir: str
    seconds: float
    peak_rss_bytes: int
    largest_rank_file_bytes: int
    rank_file_bytes: list


_progress = None


def _set_progress_queue(queue) -> None:
    global _progress
    _progress = queue


def _build_rank(source_path: str, tp: int, pp: int, rank: int, dtype: str, out_dir: str) -> int:
    """Write rank{rank}.safetensors; returns its size. Runs in a worker process."""
    torch.set_num_threads(1)
    source = open_source(source_path)
    target = TORCH_DTYPES[dtype]
    plan = rank_tensors(source.spec, tp, pp, rank)
    path = os.path.join(out_dir, f"rank{rank}.safetensors")
    layout = [(t.name, target, t.shape) for t in plan]
    with StreamingWriter(path, layout) as writer:
        for t in plan:
            try:
                for piece in t.pieces:
                    for rows in _row_chunks(source, piece, t.shape):
                        writer.write(t.name, rows.to(target))
                if t.pad_rows:
                    writer.write(t.name, torch.zeros((t.pad_rows,) + t.shape[1:], dtype=target))
            except ValueError as err:
                raise UserError(f"{source.describe()}: {err}; the weights do not match config.json") from None
            if _progress is not None:
                _progress.put(1)
    return os.path.getsize(path)


def _row_chunks(source, piece: Piece, shape: tuple[int, ...]):
    """The piece read in slabs of rows, so a worker never holds a whole embedding table at once."""
    if piece.dim == 1 or len(shape) < 2:
        yield source.read(piece)
        return
    lo, hi = (0, shape[0]) if piece.dim is None else (piece.start, piece.stop)
    step = max(1, _CHUNK_BYTES // (4 * max(1, shape[1])))
    for a in range(lo, hi, step):
        yield source.read(Piece(piece.source, 0, a, min(hi, a + step)))


class _PeakMemory:
    """Samples the summed resident memory of this process and its children."""

    def __init__(self, interval: float = 0.02):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me] + me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def build_engine(source_path: str, out_dir: str, parallel: ParallelConfig, engine: EngineConfig,
                 jobs: int | None = None, overwrite: bool = False, show_progress: bool = True) -> BuildReport:
    start = time.time()
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; pass --overwrite or choose another --out")
    source = open_source(source_path)
    spec = source.spec
    parallel.check_fits(spec)
    max_seq_len = engine.max_seq_len
    if max_seq_len > spec.max_position_embeddings:
        print(f"note: engine.max_seq_len {max_seq_len} lowered to the model's max_position_embeddings "
              f"{spec.max_position_embeddings}")
        max_seq_len = spec.max_position_embeddings
    world = parallel.world_size
    jobs = max(1, min(jobs or os.cpu_count() or 1, world))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        total = sum(len(rank_tensors(spec, parallel.tp, parallel.pp, r)) for r in range(world))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with _PeakMemory() as mem:
            with ctx.Pool(jobs, initializer=_set_progress_queue, initargs=(queue,)) as pool:
                pending = [pool.apply_async(_build_rank, (str(source_path), parallel.tp, parallel.pp, r,
                                                          engine.dtype, str(partial)))
                           for r in range(world)]
                _show_progress(queue, pending, total, show_progress, world)
                sizes = [p.get() for p in pending]
        (partial / "config.json").write_text(
            json.dumps(spec.to_trtllm_config(engine.dtype, parallel.tp, parallel.pp), indent=2))
        has_tokenizer = source.save_tokenizer(partial)
        limits = asdict(engine) | {"max_seq_len": max_seq_len}
        (partial / "engine.json").write_text(json.dumps(
            {"format": ENGINE_FORMAT, **limits, "tp": parallel.tp, "pp": parallel.pp,
             "has_tokenizer": has_tokenizer, "source": source.describe()}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BuildReport(str(out), time.time() - start, mem.peak, max(sizes), sizes)


def _show_progress(queue, pending, total: int, show: bool, world: int) -> None:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="tensor", desc=f"building {world} rank file(s)", disable=not show)
    done = 0
    while done < total:
        if any(p.ready() and not p.successful() for p in pending):
            break  # a rank failed: .get() re-raises its error
        try:
            queue.get(timeout=0.1)
        except Exception:
            continue
        done += 1
        bar.update(1)
    bar.close()
