"""Liveness of the ranks, beside the control plane: heartbeats through the rendezvous store.

gloo's receives have no per-call timeout, so a rank that stops (SIGSTOP, a hung kernel, a lost node)
would keep its peers waiting for the process group's timeout. Instead every rank runs two small
threads once it has joined the mesh: one adds 1 to its own counter in the rendezvous TCPStore (hosted
by rank 0) every `period` seconds, with the number of steps it has finished, and reads the counters it
watches; the other only looks at the clock. Rank 0 watches every other rank; the others watch rank 0.
A watched counter that has not moved for `timeout` seconds means the peer is stopped or gone (a
stopped process's threads stop too; a store call that never returns is simply not a beat). Until
rank 0 has loaded its shard and says so (`mark_ready`), the longer `startup_s` applies instead: a
rank that loads weights may hold the interpreter for a while.

What happens then is the owner's choice (`on_lost`): by default the rank prints one line naming the
silent rank(s) and exits with STALL_EXIT_CODE at once; rank 0's HTTP server first fails its open
requests. The timeouts come from `meshserve serve --step-timeout/--first-step-timeout` or from the
environment (MESHSERVE_STEP_TIMEOUT, MESHSERVE_FIRST_STEP_TIMEOUT), which every launcher passes on.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

STALL_EXIT_CODE = 3   # a rank gave up on a stalled or lost peer (its message names the peer)
_PREFIX = "meshserve/watch"


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name` (unset or empty: default)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        from meshserve.errors import UserError
        raise UserError(f"{name}={raw!r} is not allowed: use a number of seconds > 0")
    return value


@dataclass(frozen=True)
class FaultTimeouts:
    step_s: float = 30.0         # a step (or a peer's silence) longer than this is a stall
    first_step_s: float = 300.0  # the first step may compile or capture graphs
    drain_s: float = 30.0        # serve: how long a stop waits for requests in flight

    @staticmethod
    def from_env() -> "FaultTimeouts":
        base = FaultTimeouts()
        step = seconds_from_env("MESHSERVE_STEP_TIMEOUT", base.step_s)
        return FaultTimeouts(step, max(step, seconds_from_env("MESHSERVE_FIRST_STEP_TIMEOUT", base.first_step_s)),
                             seconds_from_env("MESHSERVE_DRAIN_TIMEOUT", base.drain_s))


def exit_now(message: str, code: int = STALL_EXIT_CODE) -> None:
    """Print `message` as the rank's error line and end the process at once (the threads that wait
    on a stalled peer can never be joined)."""
    try:
        print(f"meshserve: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(code)


class PeerWatch:
    """Heartbeats of this rank and of the ranks it watches (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, timeout_s: float, on_lost=None,
                 startup_s: float | None = None):
        self.rank, self.world_size, self.host, self.port = rank, world_size, host, port
        self.timeout_s = timeout_s
        self.startup_s = max(timeout_s, startup_s or timeout_s)
        self.ready = False       # rank 0 has loaded its shard (followers learn it from the store)
        self.period = max(0.05, min(1.0, timeout_s / 6))
        self.watched = list(range(1, world_size)) if rank == 0 else [0]
        self.on_lost = on_lost or self._exit
        self.finished_steps = 0      # set by the rank's own loop; published with the beats
        now = time.monotonic()
        self._beats = {r: (-1, now) for r in self.watched}     # rank -> (counter, when it last moved)
        self._finished = {r: 0 for r in self.watched}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="meshserve-heartbeat", daemon=True),
                         threading.Thread(target=self._check, name="meshserve-watchdog", daemon=True)]

    def start(self) -> "PeerWatch":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def mark_ready(self) -> None:
        """Loading is over on every rank (rank 0 also tells the followers through the store): the step
        timeout applies from now on."""
        self.ready = True

    @property
    def limit_s(self) -> float:
        return self.timeout_s if self.ready else self.startup_s

    def silent(self, longer_than: float | None = None) -> dict[int, float]:
        """Watched ranks whose heartbeat has not moved for `longer_than` (default: `limit_s`) seconds:
        rank -> seconds silent."""
        now, limit = time.monotonic(), self.limit_s if longer_than is None else longer_than
        return {r: now - t for r, (_, t) in sorted(self._beats.items()) if now - t > limit}

    def unfinished(self, step_id: int) -> list[int]:
        """Watched ranks that have not reported step `step_id` finished (rank 0's view)."""
        return [r for r, n in sorted(self._finished.items()) if n <= step_id]

    def describe(self, silent: dict[int, float]) -> str:
        ranks = ", ".join(f"rank {r}" for r in silent)
        worst = max(silent.values())
        which = "--step-timeout" if self.ready else "--first-step-timeout, while loading"
        return (f"{ranks} of {self.world_size} stopped answering (no heartbeat for {worst:.1f}s; "
                f"{which} {self.limit_s:g}s)")

    def _exit(self, silent: dict[int, float]) -> None:
        who = f"rank {self.rank} of {self.world_size}: " if self.rank else ""
        what = self.describe(silent)
        if self.rank:
            what += ": the mesh cannot go on, this rank exits"
        exit_now(f"{who}{what}")

    # ---- threads -------------------------------------------------------------------------------
    def _beat(self) -> None:
        from torch.distributed import TCPStore
        store, published, announced = None, 0, False
        while not self._stop.is_set():
            try:
                if store is None:
                    store = TCPStore(self.host, self.port, None, False, timedelta(seconds=max(5.0, self.timeout_s)),
                                     wait_for_workers=False)
                store.add(f"{_PREFIX}/beat/{self.rank}", 1)
                if self.rank == 0 and self.ready and not announced:
                    store.add(f"{_PREFIX}/ready", 1)
                    announced = True
                elif self.rank != 0 and not self.ready:
                    self.ready = store.add(f"{_PREFIX}/ready", 0) > 0
                finished = self.finished_steps
                if finished != published:
                    store.add(f"{_PREFIX}/done/{self.rank}", finished - published)
                    published = finished
                for r in self.watched:
                    beat = store.add(f"{_PREFIX}/beat/{r}", 0)
                    if beat != self._beats[r][0]:
                        self._beats[r] = (beat, time.monotonic())
                    if self.rank == 0:
                        self._finished[r] = store.add(f"{_PREFIX}/done/{r}", 0)
            except Exception:  # noqa: BLE001 - the store is gone (rank 0 exited): no beat this round
                store = None
            self._stop.wait(self.period)

    def _check(self) -> None:
        while not self._stop.wait(self.period):
            silent = self.silent()
            if silent:
                self.on_lost(silent)
                return
