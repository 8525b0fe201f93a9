"""Start the ranks on this machine when no launcher did, and supervise them.

If any rank fails, the others are stopped at once and the failure names the rank, so a broken mesh
never hangs waiting on a dead peer. Ctrl-C / SIGTERM ask rank 0 to stop; it stops the others through
the mesh, and whatever is still running after a grace period is killed. The ranks die with this
process, even when it is killed outright: the kernel sends them SIGKILL when it dies
(PR_SET_PDEATHSIG), and each rank also watches its parent's pid.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait

from meshserve.errors import UserError
from meshserve.launch.launched import die_with_parent, raise_interrupt, run_rank
from meshserve.launch.rank_env import RankEnv, discover, free_port, launched_env, node_leads

# A rank that exits with code 1 lost a peer; the peer that failed first (its own exit code names the
# cause) gets this long to exit before the ranks are stopped and the failure is named.
PEER_EXIT_GRACE_S = 3.0


def run_ranks(world_size: int, target, *args, tp: int = 1, stop_grace: float = 30.0) -> None:
    """Run target(rank_env, *args) once per rank: in this process under a launcher (or for one rank),
    else in world_size spawned local processes. tp: the TP group size (its ranks must share a node);
    stop_grace: how long a requested stop may take before the ranks are killed."""
    env = launched_env()
    if env is not None:
        check_world_size(env, world_size, tp)
        target(env, *args)
        return
    if world_size == 1:
        target(discover(), *args)
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    ranks = None
    try:
        ranks = LocalRanks(world_size, target, *args)
        _supervise(ranks.procs)
    except KeyboardInterrupt:
        if ranks is not None:
            _shut_down(ranks.procs, stop_grace)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ranks is not None:
            ranks.stop()


class LocalRanks:
    """world_size processes on this machine, each running target(rank_env, *args), started at once;
    the caller watches `sentinels` (or `procs`) and calls stop(). daemon: the ranks are stopped when
    this process exits, should the caller never stop them. (ray_launcher.RayRanks answers the same
    calls for ranks in Ray actors.)"""

    def __init__(self, world_size: int, target, *args, daemon: bool = False):
        port = free_port()
        ctx = mp.get_context("spawn")
        envs = [RankEnv(r, world_size, r, "127.0.0.1", port, "local", world_size) for r in range(world_size)]
        # PR_SET_PDEATHSIG fires when the thread that started the child ends: only the main thread's
        # children can rely on it (the parent-pid watch covers the others)
        main_thread = threading.current_thread() is threading.main_thread()
        self.procs = [ctx.Process(target=_rank_main, args=(e, target, args, os.getpid(), main_thread),
                                  name=f"meshserve-rank{e.rank}", daemon=daemon) for e in envs]
        try:
            with _children_skip_main(), _children_ignore_interrupts(main_thread):
                for p in self.procs:
                    p.start()
        except BaseException:
            self.stop()
            raise

    @property
    def sentinels(self) -> list:
        """For multiprocessing.connection.wait: each turns ready, for good, when its rank has exited."""
        return [p.sentinel for p in self.procs]

    def failure(self) -> UserError | None:
        """The error that names the rank that failed first, if any has exited non-zero: a rank with an
        error of its own (any code but 1, which ranks that lost a peer exit with) before the others."""
        return _first_failure(self.procs)

    def failed_alone(self) -> bool:
        """True when a rank other than rank 0 has exited with an error of its own (any code but 0, 1,
        which ranks that lost a peer exit with, and the stall code)."""
        from meshserve.workers.runtime.watchdog import STALL_EXIT_CODE
        return any(p.exitcode not in (None, 0, 1, STALL_EXIT_CODE) for p in self.procs[1:])

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every rank to exit; True if all have."""
        deadline = time.time() + timeout
        for p in self.procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - time.time()))
        return all(not p.is_alive() for p in self.procs)

    def stop(self, grace: float = 5.0) -> None:
        """Ask every rank to stop (SIGTERM); kill the ones still running after `grace` seconds."""
        _stop_all(self.procs, grace)


_HOW_TO_START = {"mpi": "mpirun -np {n} ...", "slurm": "srun --ntasks {n} ... (or #SBATCH --ntasks={n})",
                 "torchrun": "torchrun --nproc-per-node ... with {n} processes in all"}


def check_world_size(env: RankEnv, world_size: int, tp: int = 1) -> None:
    """Refuse, before any model loads, a launch whose process count is not tp x pp, or that splits a
    TP group across nodes (global rank = pp_stage * tp + tp_rank, so each node must hold whole,
    consecutive TP groups)."""
    if env.world_size != world_size:
        how = _HOW_TO_START.get(env.launcher, "{n} ranks").format(n=world_size)
        raise UserError(f"{env.world_size} process(es) were started by {env.launcher}, but the engine is "
                        f"built for {world_size} ranks (tp x pp); start exactly {world_size}: {how}",
                        every_rank=True)  # printed by every rank: the first to exit may end the others
    if tp <= 1 or env.local_world_size == env.world_size:
        return
    how = (f"must stay inside one node: start a multiple of {tp} tasks per node in block order "
           "(#SBATCH --ntasks-per-node, srun --distribution=block, mpirun --map-by slot)")
    leads = node_leads(env)  # every rank's node, when the launcher told (MPI): then every rank refuses
    if leads is not None:
        split = [r for r in range(0, env.world_size, tp) if len(set(leads[r:r + tp])) > 1]
        if split:  # every rank prints it: the first to exit may end the others
            r = split[0]
            raise UserError(f"ranks {r}-{r + tp - 1} (one TP group) run on different nodes, but a TP group of "
                            f"tp={tp} ranks {how}", every_rank=True)
    elif env.local_world_size % tp or (env.rank - env.local_rank) % tp:
        raise UserError(f"rank {env.rank} is one of {env.local_world_size} rank(s) on its node, but a TP group "
                        f"of tp={tp} ranks {how}")


def _shut_down(procs, grace: float = 30.0) -> None:
    """Ask rank 0 to stop (it tells the others through the mesh); wait, then report how it went."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if procs[0].is_alive():
        os.kill(procs[0].pid, signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    if all(c == 0 for c in codes):
        return
    _stop_all(procs)
    raise UserError(f"stopped on request; rank exit codes {codes}")


def _rank_main(env: RankEnv, target, args, parent: int, deathsig: bool = True) -> None:
    die_with_parent(parent, deathsig)
    # Ctrl-C (and a terminal's hangup) reaches every process of the terminal: only rank 0 acts on
    # Ctrl-C, the others follow rank 0; a hangup is the parent's to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN if env.rank else signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if env.rank == 0:
        signal.signal(signal.SIGTERM, raise_interrupt)
    sys.exit(run_rank(env, target, args).code)


def _supervise(procs) -> None:
    """Wait for every rank; the first to exit non-zero is named as the cause."""
    alive = {p.sentinel: r for r, p in enumerate(procs)}
    while alive:
        for sentinel in wait(list(alive)):
            rank = alive.pop(sentinel)
            procs[rank].join()
            code = procs[rank].exitcode
            if code != 0:
                if code == 1:  # it lost a peer: the peer that failed may still be on its way out with its own code
                    deadline = time.time() + PEER_EXIT_GRACE_S
                    for p in procs:
                        p.join(max(0.0, deadline - time.time()))
                error = _first_failure(procs)
                _stop_all(procs)
                raise error


@contextlib.contextmanager
def _children_skip_main():
    """Ranks run meshserve's code only, so a spawned rank must not re-run the calling script (as
    `spawn` does by default): a script without an `if __name__ == "__main__"` guard would start
    ranks again from inside each rank."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            setattr(main, k, None)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


@contextlib.contextmanager
def _children_ignore_interrupts(main_thread: bool):
    """Ranks start with SIGINT and SIGHUP ignored (an ignored signal stays ignored across exec), so
    a Ctrl-C while a rank still imports its modules does not print a traceback from each rank; the
    rank sets its own handlers once it runs. Only the main thread may change handlers."""
    if not main_thread:
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: set outside Python, left as it is
                signal.signal(sig, handler)


def _first_failure(procs) -> UserError | None:
    """The error that names the rank that failed first, if any has exited non-zero: a rank with an
    error of its own (any code but 1, which ranks that lost a peer exit with) before the others."""
    failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
    if not failed:
        return None
    rank, code = min(failed, key=lambda rc: (rc[1] == 1, rc[0]))
    return rank_failed(rank, len(procs), code)


class RankFailed(UserError):
    """A rank of this machine's mesh exited non-zero (the message names it); `code`: its exit code
    (negative: the signal that killed it)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def rank_failed(rank: int, world_size: int, code: int) -> UserError:
    from meshserve.workers.runtime.watchdog import STALL_EXIT_CODE
    if code == STALL_EXIT_CODE:
        return RankFailed(f"rank {rank} of {world_size} gave up on a stalled or lost peer (exit code {code}; the "
                          "line above names the peer); the other ranks were stopped", code)
    return RankFailed(f"rank {rank} of {world_size} exited with code {code} ({_cause(code)}); "
                      "the other ranks were stopped", code)


def _cause(code: int) -> str:
    """Why a rank exited with `code`, in words: the signal that killed it, or where its error is."""
    if code == 130:
        return "interrupted"
    if code >= 0:
        return "its error is above"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGBUS:  # a memory-mapped file that shrank under the rank
        return (f"killed by {name}: a rank file was truncated or overwritten while in use, or /dev/shm is full; "
                "rebuild the engine if it changed, and check the free space in /dev/shm")
    return f"killed by {name}"


def _stop_all(procs, grace: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join()
