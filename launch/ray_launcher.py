"""Run one rank per Ray actor, on an existing Ray cluster or on a local one started for the run.

Placement: every rank gets one bundle ({"CPU": c} or {"GPU": 1, "CPU": c}). When one node can hold
the whole mesh, a single STRICT_PACK placement group keeps every rank there; otherwise there is one
STRICT_PACK group per pipeline stage (tp bundles each). A TP group all-reduces after every sub-layer
and must share a node; stages exchange one activation per step and may sit on different nodes.
("PACK" with ordered bundles is only best effort: Ray may split a TP group across nodes when the
cluster is fragmented; STRICT_PACK per stage never does.)

Rank 0's actor picks the rendezvous (its node's IP and a free port there); each rank learns its
local rank and local world size from the nodes the actors landed on. On GPUs every rank of a node
sees that node's mesh GPUs in local-rank order, so `cuda:local_rank` is the GPU Ray gave it.

Shutdown: Ctrl-C or SIGTERM to the driver sends SIGTERM to rank 0's process (rank 0 stops the
others through the mesh); after a grace period, and always on exit, every actor is killed and the
placement groups are removed. Actors are owned by the driver, so they also die with it.

Restart on failure (`meshserve serve --launcher ray --restart-on-failure N`): the driver serves HTTP
itself and starts the ranks through RayMesh, which keeps the placement; RayRanks follows one start of
the actors (a thread waits on their run calls) and answers what local_spawn.LocalRanks answers, so the
linked front end (orchestrator/linked_engine.py) stops them and starts new actors in the same bundles
when one dies or the mesh stalls.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

from meshserve.errors import UserError
from meshserve.launch.launched import raise_interrupt, run_rank
from meshserve.launch.rank_env import RankEnv, free_port

STOP_GRACE_S = 30.0       # rank 0 stops the mesh within this (plus its drain timeout), or every rank is killed
TEARDOWN_LIMIT_S = 60.0   # killing actors and disconnecting; past it the driver exits anyway
PLACEMENT_TIMEOUT_S = 300.0
# Variables of the driver's environment that actors inherit (others come from the cluster's nodes).
FORWARDED_PREFIXES = ("MESHSERVE_",)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--launcher ray needs Ray in this Python environment: "
                        "pip install 'meshserve[ray]' (ray[default])") from None
    return ray


# ---- inside the actors ------------------------------------------------------------------------

_BOARD = None  # the driver's message board, set in each rank's process while it runs


def announce(text: str) -> None:
    """Have the driver print `text` (from inside a rank started by this launcher); returns once the
    driver can see it."""
    if _BOARD is not None:
        import ray
        ray.get(_BOARD.post.remote(text))


class RankActor:
    """One rank's process. `run` executes in the actor's main thread, so signal handlers work."""

    def where(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpus": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}

    def pick_port(self, host: str) -> int:
        return free_port(host)

    def run(self, env: RankEnv, extra_env: dict, board, target, args) -> dict:
        global _BOARD
        os.environ.update(extra_env)
        _BOARD = board
        try:
            outcome = run_rank(env, target, args)
        finally:
            _BOARD = None
        return {"ok": True, "code": 0} if outcome.code == 0 else \
            {"ok": False, "code": outcome.code, "error": outcome.error}


class MessageBoard:
    """Lines ranks want the driver to print (an async actor: `next` waits without blocking `post`)."""

    def __init__(self):
        import asyncio
        self._lines: list[str] = []
        self._changed = asyncio.Condition()

    async def post(self, text: str) -> None:
        async with self._changed:
            self._lines.append(text)
            self._changed.notify_all()

    async def next(self, index: int) -> str:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._lines) > index)
            return self._lines[index]

    async def since(self, index: int) -> list[str]:
        return self._lines[index:]


def _send_signal(pid: int, signum: int) -> None:
    os.kill(pid, signum)


# ---- the driver -------------------------------------------------------------------------------

@dataclass
class _Placement:
    groups: list          # placement groups
    slots: list           # per rank: (group index, bundle index)


def run_ranks_on_ray(world_size: int, tp: int, target, *args, address: str | None = None,
                     gpus_per_rank: float | None = None, cpus_per_rank: float = 1.0) -> None:
    """Run target(rank_env, *args) once per rank, each in its own Ray actor, and wait for all.

    address: "auto" or HOST:PORT of a running cluster; None uses RAY_ADDRESS when set (as under
    `ray job submit`), else starts a private local cluster for this run. gpus_per_rank: 1 or 0
    (None: 1 when the cluster has a GPU per rank and MESHSERVE_DEVICE is not cpu).
    Returns when every rank finished cleanly; raises UserError naming the rank that failed, or
    KeyboardInterrupt when stopped before rank 0 came up.
    """
    mesh = RayMesh(world_size, tp, address=address, gpus_per_rank=gpus_per_rank, cpus_per_rank=cpus_per_rank)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        mesh.place()
        board = mesh.keep(mesh.ray.remote(MessageBoard).options(num_cpus=0).remote())
        ranks = mesh.start(target, *args, board=board)  # followed by _supervise below
        _supervise(mesh.ray, ranks.refs, board, ranks.where[0], mesh.watchdog)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mesh.close()
        signal.signal(signal.SIGTERM, previous)


class RayMesh:
    """The Ray side of one mesh: the cluster connection (made here), the placement of its ranks
    (place()), and every start of its rank actors (start(), which may run again in the same bundles
    after a failure, from another thread). close() kills every actor started here, removes the
    placement groups and disconnects (stopping the local cluster when this run started it); no call
    to Ray is made here after that (most of Ray's calls would start a new local cluster)."""

    def __init__(self, world_size: int, tp: int, *, address: str | None = None, gpus_per_rank: float | None = None,
                 cpus_per_rank: float = 1.0):
        _check_options(world_size, tp, gpus_per_rank, cpus_per_rank)
        self.world_size, self.tp, self.cpus = world_size, tp, cpus_per_rank
        self.gpus: int | None = None if gpus_per_rank is None else int(gpus_per_rank)
        self.ray = _import_ray()
        self.private = _connect(self.ray, address, world_size, cpus_per_rank)
        self.driver_ip: str = self.ray.util.get_node_ip_address()  # where the cluster's nodes reach this process
        self.watchdog = _Watchdog()
        self.placement: _Placement | None = None
        self._actors: list = []
        self._groups: list = []
        self._cond = threading.Condition()
        self._busy = 0       # calls into Ray in progress (close() waits for them)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def ray_calls(self):
        """Around calls into Ray from any thread: raises MeshClosed once close() has begun, and
        close() waits for those in progress before it disconnects."""
        with self._cond:
            if self._closed:
                raise MeshClosed("the Ray mesh is being stopped")
            self._busy += 1
        try:
            yield self.ray
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def place(self) -> None:
        """Reserve a bundle per rank (see the module docstring); waits until Ray has them."""
        with self.ray_calls():
            if self.gpus is None:
                self.gpus = _gpus_per_rank(self.ray, self.world_size)
            self.placement = _place(self.ray, self.world_size, self.tp, self.gpus, self.cpus, self._groups,
                                    can_grow=not self.private)

    def keep(self, actor):
        """Have close() kill `actor` too; returns it."""
        with self._cond:
            self._actors.append(actor)
        return actor

    def start(self, target, *args, board=None, watch: bool = False) -> RayRanks:
        """One actor per rank in the reserved bundles, each running target(rank_env, *args); `board`:
        the MessageBoard whose lines the caller prints (None: announcements are dropped); watch: a
        thread follows the ranks for RayRanks' sentinels, failure() and join()."""
        with self.ray_calls():
            actors: list = []
            try:
                where = _start_actors(self.ray, self.placement, self.gpus, self.cpus, actors, lambda: self._closed)
            finally:
                for actor in actors:
                    self.keep(actor)
            envs, extra = _rank_envs(self.ray, actors, where, self.gpus)
            refs = [a.run.remote(e, x, board, target, args) for a, e, x in zip(actors, envs, extra)]
        return RayRanks(self, actors, refs, where, watch)

    def close(self) -> None:
        """Kill every actor, remove the placement groups and disconnect, once the calls into Ray in
        progress have ended (safe to call twice); past TEARDOWN_LIMIT_S the process exits."""
        self.watchdog.arm(TEARDOWN_LIMIT_S)
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._busy == 0)
            actors, self._actors = self._actors, []
        _tear_down(self.ray, actors, self._groups)
        self.ray.shutdown()  # disconnects; also stops the local cluster when this run started it
        self.watchdog.cancel()


class MeshClosed(UserError):
    """A call into Ray after RayMesh.close() began."""


class RayRanks:
    """One start of a mesh's rank actors. With `watch`, for a supervisor that waits on file
    descriptors (the linked front end): a thread waits on every rank's run call, and `sentinels` (a
    pipe's read end, for multiprocessing.connection.wait) turns readable, for good, once any rank has
    ended or the mesh is closing. (The pipe stays open while this process lives: a reader may still
    be waiting on it.)"""

    def __init__(self, mesh: RayMesh, actors: list, refs: list, where: list[dict], watch: bool = True):
        self.mesh, self.actors, self.refs, self.where = mesh, actors, refs, where
        self.ended: dict[int, tuple[int | None, str]] = {}  # rank -> (exit code, None: its actor died; what it said)
        self.order: list[int] = []                          # ranks in the order they were seen to end
        self._cond = threading.Condition()
        self._stopped = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self.sentinels = [self._read_fd]
        if watch:
            threading.Thread(target=self._watch, name="meshserve-ray-ranks", daemon=True).start()

    def _watch(self) -> None:
        rank_of = {ref: r for r, ref in enumerate(self.refs)}
        try:
            while rank_of and not self._stopped:
                with self.mesh.ray_calls() as ray:
                    done, _ = ray.wait(list(rank_of), num_returns=1, timeout=0.5)
                    for ref in done:
                        self._ended(ray, rank_of.pop(ref), ref)
        except Exception:  # noqa: BLE001 - the mesh is closing (or Ray failed): nothing more to see
            pass
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
            self._wake()

    def _ended(self, ray, rank: int, ref) -> None:
        try:
            result = ray.get(ref)
            code = result.get("code", 0 if result["ok"] else 1)
            said = (result.get("error") or "").strip().splitlines()
            said = said[-1] if said else f"exit code {code}"
        except ray.exceptions.RayActorError:  # killed, crashed, or ended by the stall watchdog (os._exit)
            w = self.where[rank]
            code, said = None, f"its Ray actor died (pid {w['pid']} on {w['ip']}; an error it printed is above)"
        except Exception as err:  # noqa: BLE001 - any other way its call failed
            code, said = 1, _describe(ray, err)
        with self._cond:
            self.ended[rank] = (code, said)
            self.order.append(rank)
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._write_fd, b"x")
        except OSError:  # full: it is readable already
            pass

    def failure(self) -> UserError | None:
        """The error that names the rank that failed first, if any has failed: the first to end with
        an error of its own (not code 1, the loss of a peer), else the first to end non-zero."""
        with self._cond:
            failed = [(i, r) for i, r in enumerate(self.order) if self.ended[r][0] != 0]
            if not failed:
                return None
            _, rank = min(failed, key=lambda ir: (self.ended[ir[1]][0] == 1, ir[0]))
            said = self.ended[rank][1]
        return RankFailed(f"rank {rank} of {len(self.refs)} failed: {said}; the other ranks were stopped")

    def failed_alone(self) -> bool:
        """True when a rank other than rank 0 ended with an error of its own (its actor died, or any
        code but 0, 1 and the stall code) before rank 0 ended."""
        from meshserve.workers.runtime.watchdog import STALL_EXIT_CODE
        with self._cond:
            for rank in self.order:
                if rank == 0:
                    return False
                if self.ended[rank][0] not in (0, 1, STALL_EXIT_CODE):
                    return True
        return False

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every rank to end; True if all have."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.ended) == len(self.refs) or self._stopped, timeout)
            return len(self.ended) == len(self.refs)

    def stop(self, grace: float = 0.0) -> None:
        """Kill every actor of this start at once (`grace` is for the local ranks' signature: actors
        get none); the placement stays, for the next one."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        try:
            with self.mesh.ray_calls() as ray:
                _tear_down(ray, self.actors, [])
        except MeshClosed:
            pass  # close() kills them
        self._wake()


class RankFailed(UserError):
    """A rank of a mesh of Ray actors failed (the message names it)."""


def _check_options(world_size: int, tp: int, gpus_per_rank: float | None, cpus_per_rank: float) -> None:
    if tp < 1 or world_size % tp:
        raise UserError(f"world size {world_size} is not a multiple of tp={tp}")
    if cpus_per_rank <= 0:
        raise UserError(f"--cpus-per-rank={cpus_per_rank} is not allowed: use a number above 0")
    if gpus_per_rank not in (None, 0, 1):
        raise UserError(f"--gpus-per-rank={gpus_per_rank} is not allowed: each rank drives exactly one GPU "
                        "(1) or none (0); NCCL cannot put two ranks of a mesh on one GPU")


class _Watchdog:
    """Ends the driver if stopping hangs (say, a Ray daemon died): the actors die with their owner."""

    def __init__(self):
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(seconds, self._give_up, args=(seconds,))
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @staticmethod
    def _give_up(seconds: float) -> None:
        print(f"meshserve: error: Ray did not finish stopping the ranks within {seconds:.0f}s; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)


def _connect(ray, address: str | None, world_size: int, cpus_per_rank: float) -> bool:
    """Connect to the cluster, or start a local one sized for the mesh; True when started here."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # Ray's CPUs are logical: declare enough for every rank even on a small machine.
        cpus = max(os.cpu_count() or 1, math.ceil(world_size * cpus_per_rank))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        return True
    try:
        ray.init(address=address)
    except ConnectionError as err:
        where = address or os.environ.get("RAY_ADDRESS")
        raise UserError(f"cannot connect to the Ray cluster at {where} ({err}); start one with "
                        "`ray start --head`, or leave out --ray-address to start a local one") from None
    return False


def _gpus_per_rank(ray, world_size: int) -> int:
    device = os.environ.get("MESHSERVE_DEVICE", "auto")
    if device == "cpu":
        return 0
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= world_size:
        return 1
    if device == "cuda":
        raise UserError(f"MESHSERVE_DEVICE=cuda but the Ray cluster has {gpus:g} GPU(s) for {world_size} ranks; "
                        "add GPU nodes, or use MESHSERVE_DEVICE=cpu")
    return 0


def _node_capacities(ray) -> list[dict]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _fits(node: dict, ranks: int, gpus: int, cpus: float) -> bool:
    return node.get("CPU", 0) >= ranks * cpus and node.get("GPU", 0) >= ranks * gpus


def _place(ray, world_size: int, tp: int, gpus: int, cpus: float, groups: list,
           can_grow: bool = True) -> _Placement:
    """Reserve one bundle per rank so that each TP group (contiguous ranks) shares a node; the
    placement groups are appended to `groups` as they are made (for the caller to remove).
    can_grow: False for the local cluster started for this run, which never gains nodes."""
    from ray.util.placement_group import placement_group
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    nodes = _node_capacities(ray)
    if not can_grow and not any(_fits(n, world_size, gpus, cpus) for n in nodes):
        have = ray.cluster_resources()
        raise UserError(f"the local Ray cluster started for this run has {have.get('CPU', 0):g} CPU(s) and "
                        f"{have.get('GPU', 0):g} GPU(s), not enough for {world_size} rank(s) of {bundle}: use "
                        "--gpus-per-rank 0 (CPU ranks), or --ray-address of a cluster with room")
    if any(_fits(n, world_size, gpus, cpus) for n in nodes):
        groups.append(placement_group([dict(bundle) for _ in range(world_size)], strategy="STRICT_PACK"))
        slots = [(0, r) for r in range(world_size)]
    else:
        if not any(_fits(n, tp, gpus, cpus) for n in nodes):
            print(f"meshserve: no Ray node has room for a TP group of {tp} rank(s) ({bundle} each); "
                  f"waiting up to {PLACEMENT_TIMEOUT_S:.0f}s for the cluster to grow", file=sys.stderr, flush=True)
        groups.extend(placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
                      for _ in range(world_size // tp))
        slots = [divmod(r, tp) for r in range(world_size)]
    placement = _Placement(list(groups), slots)
    ready = [g.ready() for g in groups]
    if not _wait_all(ray, ready, 10.0):
        print(f"meshserve: waiting for Ray to reserve {world_size} x {bundle} (each TP group of {tp} on one node)",
              file=sys.stderr, flush=True)
    if not _wait_all(ray, ready, PLACEMENT_TIMEOUT_S):
        raise UserError(f"Ray could not reserve {world_size} x {bundle} with each TP group of {tp} on one node "
                        f"within {PLACEMENT_TIMEOUT_S:.0f}s; cluster resources: {ray.cluster_resources()}. "
                        "Add nodes, or lower --cpus-per-rank / --gpus-per-rank")
    return placement


def _wait_all(ray, refs, timeout: float, cancelled=None) -> bool:
    """Wait in short slices (so Ctrl-C and SIGTERM are handled at once); True when all are ready.
    cancelled(): checked between slices; when true, raises MeshClosed."""
    deadline, pending = time.time() + timeout, list(refs)
    while pending and time.time() < deadline:
        if cancelled is not None and cancelled():
            raise MeshClosed("the Ray mesh is being stopped")
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
    return not pending


def _start_actors(ray, placement: _Placement, gpus: int, cpus: float, actors: list, cancelled=None) -> list[dict]:
    """One actor per rank, appended to `actors`; returns where each one runs. cancelled: see _wait_all."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    cls = ray.remote(RankActor)
    for rank, (group, index) in enumerate(placement.slots):
        strategy = PlacementGroupSchedulingStrategy(placement.groups[group], placement_group_bundle_index=index)
        actors.append(cls.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=1,
                                  scheduling_strategy=strategy).remote())
    refs = [a.where.remote() for a in actors]
    try:
        if not _wait_all(ray, refs, PLACEMENT_TIMEOUT_S, cancelled):
            raise TimeoutError(f"not all were up after {PLACEMENT_TIMEOUT_S:.0f}s")
        where = ray.get(refs)
    except MeshClosed:
        raise
    except Exception as err:  # noqa: BLE001 - reported; the caller tears the actors down
        raise UserError(f"the rank actors did not start: {_describe(ray, err)}") from None
    return where


def _rank_envs(ray, actors, where: list[dict], gpus: int):
    """Each rank's RankEnv and the extra variables its process needs."""
    world = len(actors)
    by_node: dict[str, list[int]] = {}
    for rank, w in enumerate(where):
        by_node.setdefault(w["node_id"], []).append(rank)
    master_addr = where[0]["ip"]
    master_port = ray.get(actors[0].pick_port.remote(master_addr))
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    for key in RankEnv(0, 1, 0, "", 0, "ray").as_env():
        forwarded.pop(key, None)
    envs, extra = [], []
    for rank, w in enumerate(where):
        peers = by_node[w["node_id"]]
        envs.append(RankEnv(rank, world, peers.index(rank), master_addr, master_port, "ray", len(peers)))
        x = dict(forwarded)
        # every rank of a node sees the node's mesh GPUs in local-rank order (none for CPU ranks)
        x["CUDA_VISIBLE_DEVICES"] = ",".join(where[p]["gpus"][0] for p in peers) if gpus else ""
        extra.append(x)
    return envs, extra


def _supervise(ray, refs, board, rank0_where: dict, watchdog: _Watchdog) -> None:
    """Print what ranks announce; return when all ranks finished cleanly, raise when one failed."""
    results: dict[int, dict] = {}
    state = {"lines": 0, "serving": False}
    try:
        _wait_ranks(ray, refs, board, results, state, deadline=None)
    except KeyboardInterrupt:
        if not state["serving"]:
            raise  # still starting: nothing to stop gracefully, the caller kills the actors
        print("meshserve: stopping (asking rank 0 to shut the mesh down)", file=sys.stderr, flush=True)
        from meshserve.workers.runtime.watchdog import FaultTimeouts
        grace = STOP_GRACE_S + FaultTimeouts.from_env().drain_s  # rank 0 drains its requests first
        watchdog.arm(grace + TEARDOWN_LIMIT_S)
        try:
            ray.remote(_send_signal).options(num_cpus=0, scheduling_strategy=_on_node(rank0_where["node_id"])) \
                .remote(rank0_where["pid"], signal.SIGTERM)
            _wait_ranks(ray, refs, board, results, state, deadline=time.time() + grace)
        except _RankFailed as failed:
            raise UserError(f"while stopping: {failed}") from None
        missing = [r for r in range(len(refs)) if r not in results]
        if missing:
            raise UserError(f"stopped on request, but rank(s) {missing} did not finish within "
                            f"{grace:.0f}s and were killed") from None
    except _RankFailed as failed:
        raise UserError(f"{failed}; the other ranks were stopped") from None


class _RankFailed(Exception):
    pass


def _on_node(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _wait_ranks(ray, refs, board, results: dict, state: dict, deadline: float | None) -> None:
    rank_of = {ref: r for r, ref in enumerate(refs) if r not in results}
    line_ref = board.next.remote(state["lines"])
    while rank_of:
        if deadline is not None and time.time() > deadline:
            return
        done, _ = ray.wait(list(rank_of) + [line_ref], num_returns=1, timeout=0.5)
        for ref in done:
            if ref == line_ref:
                _show([ray.get(ref)], state)
                line_ref = board.next.remote(state["lines"])
                continue
            rank = rank_of.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the actor died or its task raised
                raise _RankFailed(f"rank {rank} of {len(refs)} failed: {_describe(ray, err)}") from None
            results[rank] = result
            if not result["ok"]:
                raise _RankFailed(f"rank {rank} of {len(refs)} failed: {result['error']}")
    _show(ray.get(board.since.remote(state["lines"])), state)  # posted just before the last rank ended


def _show(lines: list[str], state: dict) -> None:
    for text in lines:
        print(text, flush=True)
        state["lines"] += 1
        state["serving"] = state["serving"] or text.startswith(SERVING_PREFIX)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _describe(ray, err: BaseException) -> str:
    """What a Ray error says went wrong, in a line or two, with a hint when meshserve is missing."""
    if isinstance(err, ray.exceptions.RayActorError):
        lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip() and ln[:1] != "\t"]
        text = "its Ray actor died: " + " ".join(lines)
    elif isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        lines = [ln.strip() for ln in _ANSI.sub("", str(err.cause)).splitlines() if ln.strip()]
        text = f"{type(err.cause).__name__}: {lines[0] if lines else ''}"
    else:
        lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip()]
        text = lines[-1] if lines else type(err).__name__
    if "No module named" in text:
        text += (" (Ray's workers cannot import the code: install meshserve in the same Python environment "
                 "on every node, or submit with `ray job submit --working-dir .`)")
    return text


def _tear_down(ray, actors, groups) -> None:
    """Kill every actor and remove every placement group (safe to call twice)."""
    from ray.util.placement_group import remove_placement_group
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 - already removed
            pass


# ---- serving ----------------------------------------------------------------------------------

SERVING_PREFIX = "meshserve: serving on "
_SERVING_LINE = re.compile(r"meshserve: serving on http://(\[[^\]]*\]|[^:/\s]+):(\d+)")


def serve_on_ray(rank_program, engine_dir: str, host: str | None, port: int, model_name: str | None = None,
                 limits=None, *, address: str | None = None, gpus_per_rank: float | None = None,
                 cpus_per_rank: float = 1.0) -> None:
    """`meshserve serve --launcher ray`: every actor runs rank_program(env, engine_dir, host, port,
    model_name, limits); rank 0 binds `host` (default: its node's IP) and the driver prints the address
    clients use."""
    from pathlib import Path

    from meshserve.workers.engine_files import read_engine_meta
    engine_dir = str(Path(engine_dir).resolve())  # actors do not share the driver's working directory
    meta = read_engine_meta(engine_dir, limits)
    name = model_name or Path(engine_dir).name
    run_ranks_on_ray(meta.world_size, meta.tp, _serve_rank, rank_program, engine_dir, host, port, name, limits,
                     address=address, gpus_per_rank=gpus_per_rank, cpus_per_rank=cpus_per_rank)


def _serve_rank(env: RankEnv, serve_rank, engine_dir: str, host: str | None, port: int, model_name: str,
                limits) -> None:
    import ray
    if env.rank != 0:
        serve_rank(env, engine_dir, host or "127.0.0.1", port, model_name, limits)
        return
    node_ip = ray.util.get_node_ip_address()
    watcher = _ServingLineWatcher(sys.stdout, node_ip)
    sys.stdout = watcher
    try:
        serve_rank(env, engine_dir, host or node_ip, port, model_name, limits)
    finally:
        sys.stdout = watcher.inner


class _ServingLineWatcher:
    """Stdout of rank 0: the API server's "serving on" line becomes an announcement to the driver,
    with an address clients can use (the node's IP when bound to all interfaces)."""

    def __init__(self, inner, node_ip: str):
        self.inner, self.node_ip, self._partial = inner, node_ip, ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            m = _SERVING_LINE.search(line)
            if m:
                host = m.group(1)
                client_host = self.node_ip if host in ("0.0.0.0", "[::]", "") else host
                announce(f"{SERVING_PREFIX}http://{client_host}:{m.group(2)}")
                line = f"meshserve: rank 0 listening on {host}:{m.group(2)}"
            self.inner.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        # a partial line goes out now (progress bars) unless it may still become the serving line
        if self._partial and not (SERVING_PREFIX.startswith(self._partial) or self._partial.startswith(SERVING_PREFIX)):
            self.inner.write(self._partial)
            self._partial = ""
        self.inner.flush()

    def __getattr__(self, name):
        return getattr(self.inner, name)
