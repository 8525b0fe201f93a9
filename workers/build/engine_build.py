"""`meshserve build`: shard a checkpoint into per-rank TensorRT-LLM checkpoint files.

Each rank file is written by its own process from only the slices it needs; the engine appears
under its final name only when every file is complete. Under a launcher (mpirun, srun) the launched
processes share the work: each writes the rank files r with r % nprocs == its rank into one shared
partial folder, and rank 0 finishes the engine once all have succeeded.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from meshserve.errors import UserError
from meshserve.workers.build.checkpoint_source import open_source
from meshserve.workers.engine_files import ENGINE_FORMAT, TORCH_DTYPES
from meshserve.workers.engine_layout import Piece, check_layout, rank_tensors
from meshserve.workers.build.safetensors_io import StreamingWriter

_CHUNK_BYTES = 32 << 20  # rows read, converted and written at a time


@dataclass
class BuildReport:
    out_dir: str
    seconds: float
    peak_rss_bytes: int
    largest_rank_file_bytes: int
    rank_file_bytes: list
    load_format: str = "safetensors"  # "dummy": no rank files; rank_file_bytes are the weights made at load


_progress = None


def _set_progress_queue(queue) -> None:
    """Pool worker start: report progress to `queue`; stop on SIGTERM even if the parent ignores it."""
    global _progress
    _progress = queue
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
                if not t.pieces and t.pad_cols:  # this rank's columns are all padding
                    writer.write(t.name, torch.zeros(t.shape, dtype=target))
                for piece in t.pieces:
                    for rows in _row_chunks(source, piece, t.shape):
                        if t.pad_cols:
                            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], t.pad_cols)], dim=1)
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


def build_engine(source_path: str, out_dir: str, parallel, engine,
                 jobs: int | None = None, overwrite: bool = False, show_progress: bool = True,
                 group=None) -> BuildReport:
    """Build the engine. parallel: its tp and pp (orchestrator.config.ParallelConfig); engine: the
    EngineConfig dataclass (dtype and the limits written to engine.json). With `group` (a
    launch.rank_sync.RankGroup of several processes) every
    process of the group calls this and builds its share. Only rank 0 prints."""
    if group is not None and group.size > 1:
        return _build_shared(source_path, out_dir, parallel, engine, jobs, overwrite, show_progress, group)
    start = time.time()
    out, source, max_seq_len = _check(source_path, out_dir, parallel, engine, overwrite, True)
    world = parallel.world_size
    jobs = max(1, min(jobs or os.cpu_count() or 1, world))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        with _PeakMemory() as mem:
            sizes = _build_ranks(str(source_path), source.spec, parallel, engine.dtype, partial, list(range(world)),
                                 jobs, show_progress, in_process=False)
        _finish(source, partial, out, parallel, engine, max_seq_len)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BuildReport(str(out), time.time() - start, mem.peak, max(sizes), sizes)


def _check(source_path, out_dir, parallel, engine, overwrite: bool, verbose: bool):
    """Refuse a build that cannot succeed: an existing output, an unreadable source, a bad layout."""
    out = _check_out(out_dir, overwrite)
    source = open_source(source_path)
    return out, source, _check_fits(source.spec, parallel, engine, verbose)


def _check_out(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; pass --overwrite or choose another --out")
    return out


def _check_fits(spec, parallel, engine, verbose: bool) -> int:
    """The engine's max_seq_len, once the layout is known to split the model."""
    check_layout(spec, parallel.tp, parallel.pp)
    max_seq_len = engine.max_seq_len
    if max_seq_len > spec.max_position_embeddings:
        if verbose:
            print(f"note: engine.max_seq_len {max_seq_len} lowered to the model's max_position_embeddings "
                  f"{spec.max_position_embeddings}")
        max_seq_len = spec.max_position_embeddings
    return max_seq_len


def _build_ranks(source_path: str, spec, parallel, dtype: str, partial: Path, ranks: list,
                 jobs: int, show_progress: bool, in_process: bool) -> list[int]:
    """Write the rank files `ranks` into `partial` (jobs at once); returns their sizes."""
    total = sum(len(rank_tensors(spec, parallel.tp, parallel.pp, r)) for r in ranks)
    if not ranks:
        return []
    if in_process:
        global _progress
        from tqdm import tqdm
        bar = tqdm(total=total, unit="tensor", desc=f"building {len(ranks)} rank file(s)", disable=not show_progress)
        _progress, threads = _BarTick(bar), torch.get_num_threads()
        try:
            return [_build_rank(source_path, parallel.tp, parallel.pp, r, dtype, str(partial)) for r in ranks]
        finally:
            _progress = None
            torch.set_num_threads(threads)
            bar.close()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # A process pool that fails every pending job when a worker dies (multiprocessing.Pool would wait forever).
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_set_progress_queue, initargs=(queue,)) as pool:
        pending = [pool.submit(_build_rank, source_path, parallel.tp, parallel.pp, r, dtype, str(partial))
                   for r in ranks]
        _show_progress(queue, pending, total, show_progress, len(ranks))
        try:
            return [p.result() for p in pending]
        except BrokenProcessPool:
            raise UserError("a build worker process died (out of memory?); the build was stopped") from None


class _BarTick:
    """Progress of an in-process build: each finished tensor moves the bar."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _finish(source, partial: Path, out: Path, parallel, engine,
            max_seq_len: int, load_format: str | None = None) -> None:
    """Write config.json, engine.json and the tokenizer next to the rank files, then publish.
    load_format "dummy": engine.json says so, and there are no rank files."""
    (partial / "config.json").write_text(
        json.dumps(source.spec.to_trtllm_config(engine.dtype, parallel.tp, parallel.pp), indent=2))
    has_tokenizer = source.save_tokenizer(partial)
    limits = asdict(engine) | {"max_seq_len": max_seq_len}
    (partial / "engine.json").write_text(json.dumps(
        {"format": ENGINE_FORMAT, **({"load_format": load_format} if load_format else {}), **limits,
         "tp": parallel.tp, "pp": parallel.pp, "has_tokenizer": has_tokenizer, "source": source.describe()},
        indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def _build_shared(source_path, out_dir, parallel, engine, jobs: int | None,
                  overwrite: bool, show_progress: bool, group) -> BuildReport:
    """Every process of `group` builds the rank files r with r % group.size == group.rank into one
    partial folder named by rank 0; rank 0 publishes the engine once every process has succeeded.
    The folder must be on a file system that every node sees."""
    start = time.time()
    lead = group.is_lead
    out, source, max_seq_len = group.agreed("checking the build", lambda: _check(
        source_path, out_dir, parallel, engine, overwrite, lead))
    world = parallel.world_size
    mine = [r for r in range(world) if r % group.size == group.rank]
    per_node = max(1, min(group.local_size, os.cpu_count() or 1))
    jobs = max(1, min(jobs or (os.cpu_count() or 1) // per_node, len(mine) or 1))
    token = group.broadcast(secrets.randbits(62) if lead else 0)
    partial = out.parent / f".{out.name}.partial-{token:x}"
    try:
        group.agreed("creating the partial engine folder", lambda: _fresh_folder(partial) if lead else None)
        with _PeakMemory() as mem:
            group.agreed("building rank files", lambda: _build_ranks(
                str(source_path), source.spec, parallel, engine.dtype, partial, mine, jobs, show_progress and lead,
                in_process=jobs == 1))
        sizes = group.agreed("finishing the engine", lambda: _finish_shared(
            source, partial, out, parallel, engine, max_seq_len) if lead else [])
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    peak = max(group.gather(mem.peak))
    return BuildReport(str(out), time.time() - start, peak, max(sizes, default=0), sizes)


def build_dummy_engine(model: str | None, shape: str | None, out_dir: str, parallel, engine,
                       overwrite: bool = False, group=None) -> BuildReport:
    """Write an engine of load format "dummy": config.json and engine.json (and the tokenizer files a
    model directory has), no rank files; each rank makes random weights of the real layout when it
    loads (workers.engine_files.load_rank_weights). The sizes come from `shape` (a name of
    random_checkpoint.SHAPES) or from `model` (a Hugging Face directory's config.json or a .gguf
    header; no tensor is read). Under a launcher's `group` rank 0 writes it."""
    from meshserve.workers.build.config_source import open_config_source
    from meshserve.workers.engine_files import rank_weight_bytes
    start = time.time()
    lead = group is None or group.is_lead

    def write():
        out = _check_out(out_dir, overwrite)
        source = open_config_source(model, shape)
        max_seq_len = _check_fits(source.spec, parallel, engine, lead)
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        _fresh_folder(partial)
        try:
            _finish(source, partial, out, parallel, engine, max_seq_len, load_format="dummy")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return out, source.spec

    if group is not None and group.size > 1:
        written = group.agreed("writing the dummy engine", lambda: write() if lead else None)
    else:
        written = write()
    if written is None:  # not rank 0
        return BuildReport(str(Path(out_dir).resolve()), time.time() - start, 0, 0, [], load_format="dummy")
    out, spec = written
    sizes = [rank_weight_bytes(spec, parallel.tp, parallel.pp, r, engine.dtype) for r in range(parallel.world_size)]
    return BuildReport(str(out), time.time() - start, psutil.Process().memory_info().rss, max(sizes), sizes,
                       load_format="dummy")


def _finish_shared(source, partial: Path, out: Path, parallel, engine,
                   max_seq_len: int) -> list[int]:
    sizes = [os.path.getsize(partial / f"rank{r}.safetensors") for r in range(parallel.world_size)]
    _finish(source, partial, out, parallel, engine, max_seq_len)
    return sizes


def _fresh_folder(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()


def _show_progress(queue, pending, total: int, show: bool, world: int) -> None:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="tensor", desc=f"building {world} rank file(s)", disable=not show)
    done = 0
    while done < total:
        if any(p.done() and p.exception() is not None for p in pending):
            break  # a rank failed: .result() re-raises its error
        try:
            queue.get(timeout=0.1)
        except Exception:
            continue
        done += 1
        bar.update(1)
    bar.close()
