"""One process of several started by an external launcher (mpirun, srun, torchrun): who acts on
Ctrl-C / SIGTERM, and how a failing rank brings the others down.

- serve / generate: rank 0 stops on SIGINT/SIGTERM/SIGHUP (it finishes what it must, then sends the
  others a shutdown plan); the other ranks ignore these signals and follow rank 0. They still exit when rank 0
  dies or stalls: their next collective fails once its sockets close, rank 0's heartbeats stop
  (workers/runtime/watchdog.py: exit within the step timeout), or the launcher stops them.
- build: every process stops on SIGINT/SIGTERM and removes the partial engine folder.
- A rank that fails alone under MPI calls MPI_Abort, so no peer waits forever on it (mpirun then stops
  every rank); srun does the same with --kill-on-bad-exit, torchrun by itself.
- A launched rank whose parent (the launcher or its daemon) goes away exits within a second.
- A rank that finds a user error prints it itself, even when every rank finds the same one: the first
  rank to exit may have the others killed before they print.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from meshserve.errors import UserError
from meshserve.launch.rank_env import RankEnv, launched_env


@dataclass
class RankOutcome:
    code: int          # the rank's exit code: 0, 2 (UserError), 130 (interrupted), 1 (anything else)
    error: str = ""    # what went wrong, as printed on stderr


def run_rank(env: RankEnv, target, args) -> RankOutcome:
    """Run one rank's program target(env, *args) with the rank's variables set (so that code below
    finds its rank), and turn how it ended into an exit code; a failure is printed on stderr with
    its rank. The one wrapper every launcher that starts ranks itself uses (local spawn, Ray)."""
    os.environ.update(env.as_env())
    try:
        target(env, *args)
        return RankOutcome(0)
    except UserError as err:
        print(f"meshserve: error: rank {env.rank}: {err}", file=sys.stderr, flush=True)
        return RankOutcome(2, str(err))
    except KeyboardInterrupt:
        return RankOutcome(130, "interrupted")
    except BaseException as err:  # noqa: BLE001 - reported, then the rank exits non-zero
        if peer_lost(err):  # another rank failed first and says why: one line here, no traceback
            text = f"rank {env.rank}: a peer rank left the mesh ({_peer_words(err)})"
            print(f"meshserve: error: {text}", file=sys.stderr, flush=True)
            return RankOutcome(1, text)
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        return RankOutcome(1, text.rstrip())


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost(err: BaseException) -> bool:
    """True for a collective or point-to-point failure because a peer rank went away (gloo's words)."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_LOST)


def _peer_words(err: BaseException) -> str:
    text = str(err)
    for words in _PEER_LOST:
        at = text.find(words)
        if at >= 0:
            return text[at:].split(". ")[0][:200]
    return text.splitlines()[0][:200]


PARENT_POLL_S = 1.0


def die_with_parent(parent: int, deathsig: bool = True) -> None:
    """End this process as soon as `parent` (the process that started it) is gone: on Linux the
    kernel sends SIGKILL when it dies (PR_SET_PDEATHSIG); a thread also checks every PARENT_POLL_S
    that this process has not been handed to another parent, in case the kernel call is missing or
    the parent died before it was made."""
    if deathsig and sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        try:
            print(f"meshserve: error: the process that started this rank ({parent}) is gone; the rank exits",
                  file=sys.stderr, flush=True)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="meshserve-parent-watch", daemon=True).start()


def raise_interrupt(*_):
    """A signal handler that turns SIGTERM into KeyboardInterrupt, so cleanup runs as for Ctrl-C."""
    raise KeyboardInterrupt


def hangup_as_terminate(*_):
    """A SIGHUP handler (a closed terminal or ssh session): stop as on SIGTERM, through whatever
    handles SIGTERM at the time (a server drains), rather than die without a word."""
    os.kill(os.getpid(), signal.SIGTERM)


def enter(command: str) -> RankEnv | None:
    """Set this process's signal handling for `command`; returns its RankEnv under a launcher."""
    env = launched_env()
    if env is not None and env.world_size > 1:
        # the launcher (mpirun or its daemon, slurmstepd, torchrun) gone means the job is over: a rank
        # it leaves behind would go on serving and holding its port (a poll, not PR_SET_PDEATHSIG, which
        # fires when the launcher's forking thread ends, not the launcher)
        die_with_parent(os.getppid(), deathsig=False)
    follower = env is not None and env.world_size > 1 and env.rank != 0
    if command == "build" or not follower:
        signal.signal(signal.SIGTERM, raise_interrupt)
        signal.signal(signal.SIGHUP, hangup_as_terminate)
    else:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    return env


def is_lead() -> bool:
    """True unless this process is a launched rank other than 0 (rank 0 prints results)."""
    env = launched_env()
    return env is None or env.rank == 0


def rank_prefix(env: RankEnv | None) -> str:
    return f"rank {env.rank}: " if env is not None and env.world_size > 1 and env.rank else ""


def leave(env: RankEnv | None, code: int, error: BaseException | None = None) -> int:
    """Exit code `code` for this rank. Under MPI a failure that the other ranks do not share aborts
    the job (otherwise MPI_Finalize at exit would wait for peers that may wait on this rank)."""
    if code and env is not None and env.launcher == "mpi" and env.world_size > 1 \
            and not getattr(error, "every_rank", False):
        sys.stdout.flush()
        sys.stderr.flush()
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(code)
    return code
