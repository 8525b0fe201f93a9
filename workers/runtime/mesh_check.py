"""Can the mesh form? A reachability check run through the rendezvous store, with short deadlines,
before gloo or NCCL try: they would wait for their process-group timeout (minutes) on a peer they
cannot reach, then fail with a traceback that names neither the host nor the setting to change.

Every rank opens a small TCP listener on each address it will advertise (rank_facts.py: gloo's, and
NCCL's on GPU), publishes its facts, waits for everyone's, and connects to every other rank's
listeners (gloo's control plane is one group over all ranks, whose pairs all connect). A connection
counts only when the rank that answers says it is the rank expected, in this mesh. Rank 0 gathers
the failures and publishes the verdict; the table and the fixes come from mesh_report.py.

`check_at_startup` is the fast form that `init_mesh` runs when the ranks span nodes; on one node it
is skipped. `meshserve check` runs the same and then one tiny collective per group (group_check.py).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from meshserve.workers.runtime.rank_facts import Finding, RankFacts

PREFIX = "meshserve/check"
DEFAULT_TIMEOUT_S = 5.0
TIMEOUT_ENV = "MESHSERVE_CHECK_TIMEOUT"


def check_timeout() -> float:
    """The deadline of each phase: MESHSERVE_CHECK_TIMEOUT seconds (`meshserve check --timeout`), else 5."""
    from meshserve.workers.runtime.watchdog import seconds_from_env
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


# ---- one connection ----------------------------------------------------------------------------

def _hello(run_id: str, rank: int) -> bytes:
    return f"meshserve-check {run_id} rank {rank}\n".encode()


class ProbeListener:
    """Answers each connection with this rank's name in this mesh, on `address` (a port the OS picks,
    as gloo's and NCCL's are)."""

    def __init__(self, address: str, run_id: str, rank: int):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.bind((address, 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._reply = _hello(run_id, rank)
        threading.Thread(target=self._serve, name="meshserve-check-listener", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(2.0)
                    conn.recv(256)
                    conn.sendall(self._reply)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN)


def connect_error(address: str, port: int, timeout: float, expect: bytes | None = None,
                  hello: bytes = b"") -> tuple[str, str] | None:
    """None when `address:port` accepts a TCP connection (and answers `expect`, when given), else
    (kind, words): kind is "timeout", "refused", "unreachable", "stranger" or "error"."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            if expect is None:
                return None
            sock.sendall(hello)
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except (socket.timeout, TimeoutError):
        return "timeout", f"timed out after {timeout:.1f}s"
    except ConnectionRefusedError:
        return "refused", "connection refused"
    except OSError as err:
        if err.errno in _UNREACHABLE:
            return "unreachable", os.strerror(err.errno).lower()
        return "error", str(err)
    if reply != expect:
        seen = reply.decode(errors="replace").strip() or "nothing"
        return "stranger", f"answered by another process ({seen[:60]!r}), not by that rank"
    return None


# ---- the whole mesh ----------------------------------------------------------------------------

@dataclass
class ProbeOutcome:
    """Rank 0's view after the check (other ranks only get `ok`)."""
    ok: bool
    facts: dict[int, RankFacts] = field(default_factory=dict)     # ranks that reached the rendezvous
    failures: list[dict] = field(default_factory=list)            # connections that failed
    missing: list[int] = field(default_factory=list)              # ranks that never reached it

    @property
    def findings(self) -> list[dict]:
        return [f for r in sorted(self.facts) for f in self.facts[r].findings]


def collect(store, keys: list[str], deadline: float) -> dict[str, bytes]:
    """The keys present in the store by `deadline` (monotonic), with their values."""
    got: dict[str, bytes] = {}
    while True:
        try:
            for key in [k for k in keys if k not in got]:
                if store.check([key]):
                    got[key] = store.get(key)
        except (RuntimeError, OSError):  # the store is gone (rank 0 ended): what we have is all there is
            return got
        if len(got) == len(keys) or time.monotonic() >= deadline:
            return got
        time.sleep(0.05)


class MeshProbe:
    """One run of the reachability check on `store` (the mesh's rendezvous store)."""

    def __init__(self, store, rank: int, world_size: int, run_id: str, timeout_s: float):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.run_id, self.timeout_s = run_id, timeout_s

    def run(self, facts: RankFacts, arrival_s: float, on_wait=None) -> ProbeOutcome:
        """arrival_s: how long to wait for every rank to publish its facts; on_wait(missing): called
        once, on rank 0, when some are still missing after the check's timeout."""
        listeners = []
        try:
            for kind, address in facts.endpoints.items():
                try:
                    listener = ProbeListener(address, self.run_id, self.rank)
                except OSError as err:
                    facts.findings.append(asdict(Finding(
                        self.rank, facts.host, f"cannot listen on {address}, the address {kind} advertises "
                        f"({err.strerror or err})", f"set {kind.upper()}_SOCKET_IFNAME on {facts.host} to an "
                        f"interface of its own: {facts.usable_interfaces()}")))
                    continue
                listeners.append(listener)
                facts.probe_ports[kind] = listener.port
            return self._exchange(facts, arrival_s, on_wait)
        finally:
            for listener in listeners:
                listener.close()

    def _exchange(self, facts: RankFacts, arrival_s: float, on_wait) -> ProbeOutcome:
        start = time.monotonic()
        self.store.set(f"{PREFIX}/facts/{self.rank}", json.dumps(facts.to_json()))
        keys = [f"{PREFIX}/facts/{r}" for r in range(self.world_size)]
        got = collect(self.store, keys, start + min(arrival_s, self.timeout_s))
        if len(got) < len(keys) and arrival_s > self.timeout_s:
            if self.rank == 0 and on_wait is not None:
                on_wait(sorted(r for r, k in enumerate(keys) if k not in got))
            got = collect(self.store, keys, start + arrival_s)
        everyone = {r: RankFacts.from_json(json.loads(got[k])) for r, k in enumerate(keys) if k in got}
        failures = self._probe(everyone)
        self.store.set(f"{PREFIX}/probes/{self.rank}", json.dumps(failures))
        verdict_key = f"{PREFIX}/verdict"
        if self.rank != 0:
            found = collect(self.store, [verdict_key], time.monotonic() + arrival_s + 2 * self.timeout_s + 5)
            return ProbeOutcome(found.get(verdict_key) == b"ok")
        probe_keys = {r: f"{PREFIX}/probes/{r}" for r in everyone}
        results = collect(self.store, list(probe_keys.values()), time.monotonic() + self.timeout_s + 2)
        outcome = ProbeOutcome(False, everyone, missing=[r for r in range(self.world_size) if r not in everyone])
        for r, key in probe_keys.items():
            if key in results:
                outcome.failures += json.loads(results[key])
            else:
                outcome.failures.append({"from": r, "to": None, "kind": "silent",
                                         "words": f"did not report its probes within {self.timeout_s + 2:.0f}s"})
        outcome.ok = not (outcome.failures or outcome.missing or outcome.findings)
        self.store.set(verdict_key, "ok" if outcome.ok else "fail")
        return outcome

    def leave(self, present: list[int] | None = None) -> None:
        """Rank 0 keeps its store up until the ranks `present` (those that reached it) have read what
        they need from it; every other rank says it is done."""
        if self.rank != 0:
            try:
                self.store.set(f"{PREFIX}/done/{self.rank}", "1")
            except (RuntimeError, OSError):
                pass
            return
        keys = [f"{PREFIX}/done/{r}" for r in (present or []) if r != 0]
        collect(self.store, keys, time.monotonic() + self.timeout_s)

    def _probe(self, everyone: dict[int, RankFacts]) -> list[dict]:
        """Connect to every other rank's listeners; the failures, as plain records."""
        targets = [(peer, kind, f.endpoints[kind], port) for peer, f in sorted(everyone.items())
                   if peer != self.rank for kind, port in f.probe_ports.items()]
        hello = _hello(self.run_id, self.rank)

        def one(target):
            peer, kind, address, port = target
            error = connect_error(address, port, self.timeout_s, _hello(self.run_id, peer), hello)
            if error is None:
                return None
            return {"from": self.rank, "to": peer, "endpoint": kind, "address": address, "port": port,
                    "kind": error[0], "words": error[1]}

        if not targets:
            return []
        with ThreadPoolExecutor(max_workers=min(64, len(targets))) as pool:
            return [r for r in pool.map(one, targets) if r is not None]


# ---- at start-up -------------------------------------------------------------------------------

def wait_for_rendezvous(host: str, port: int, timeout_s: float, total_s: float) -> tuple[str, str] | None:
    """Wait until rank 0's store at host:port accepts a connection (rank 0 may start later: a refused
    connection is retried for up to `total_s`); None once it does, else the last (kind, words) of a
    failure that went on for `timeout_s` (timed out, no route) or until `total_s`."""
    start = time.monotonic()
    bad_since = None
    while True:
        tried = time.monotonic()
        error = connect_error(host, port, min(timeout_s, 2.0))
        now = time.monotonic()
        if error is None:
            return None
        if error[0] == "refused":
            bad_since = None
        elif bad_since is None:
            bad_since = tried
        if (bad_since is not None and now - bad_since >= timeout_s) or now - start >= total_s:
            if error[0] == "timeout":
                error = ("timeout", f"timed out for {now - (bad_since or start):.1f}s")
            return error
        time.sleep(0.2)


def reach_rendezvous(rank: int, master: tuple[str, int], device, total_s: float) -> None:
    """A rank other than 0, at start-up across nodes: wait for rank 0's store (up to `total_s` while
    it refuses: rank 0 may start later), but raise a UserError naming this host, the address and the
    fix once it cannot be reached for the check's timeout (a firewall, a down link, a wrong address)."""
    from meshserve.errors import UserError
    from meshserve.workers.runtime.mesh_report import rendezvous_problem
    from meshserve.workers.runtime.rank_facts import gather_facts
    error = wait_for_rendezvous(master[0], master[1], check_timeout(), total_s)
    if error is not None:
        found = rendezvous_problem(gather_facts(rank, master[0], device, []), master, error)
        raise UserError(f"{found.problem}; fix: {found.fix}")


def check_at_startup(store, rank: int, world_size: int, tp: int, master: tuple[str, int], device,
                     auto_vars: list[str], arrival_s: float) -> None:
    """The fast form, in init_mesh when the ranks span nodes: raise a UserError (rank 0: after
    printing the table and fixes on stderr) when a rank cannot reach a peer it must talk to."""
    from meshserve.errors import UserError
    from meshserve.workers.runtime.mesh_report import render
    from meshserve.workers.runtime.rank_facts import gather_facts
    timeout = check_timeout()
    facts = gather_facts(rank, master[0], device, auto_vars)
    probe = MeshProbe(store, rank, world_size, f"{master[0]}:{master[1]}", timeout)

    def waiting(missing: list[int]) -> None:
        print(f"meshserve: waiting for rank(s) {', '.join(map(str, missing))} to reach the rendezvous at "
              f"{master[0]}:{master[1]}", file=sys.stderr, flush=True)

    outcome = probe.run(facts, arrival_s, waiting)
    probe.leave(list(outcome.facts))
    if outcome.ok:
        return
    if rank != 0:
        raise UserError("the mesh cannot form (rank 0 lists why)", every_rank=True, quiet=True)
    print(render(outcome, world_size, tp, master, timeout), file=sys.stderr, flush=True)
    raise UserError("the mesh cannot form: the ranks cannot all reach one another (the table above names each "
                    "host, address and fix; `meshserve check` runs the full check)", every_rank=True)
