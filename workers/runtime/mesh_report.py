"""What the mesh check prints: one row per rank, then each problem with the host, the address that
could not be reached and from where, and the setting that fixes it. Plain text, made on rank 0 from
the records of mesh_check.py (and group_check.py's, for `meshserve check`)."""
from __future__ import annotations

from meshserve.workers.engine_layout import mesh_coords
from meshserve.workers.runtime.net_addr import is_loopback
from meshserve.workers.runtime.rank_facts import Finding, RankFacts

_VAR = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}
MAX_LINES_PER_PROBLEM = 8


def _var(facts: RankFacts | None, name: str) -> str:
    if facts is None:
        return "?"
    value = facts.ifname_vars.get(name, "")
    return "-" if not value else f"{value} (auto)" if name in facts.ifname_auto else value


def table(world_size: int, tp: int, facts: dict[int, RankFacts], peers: dict[int, str],
          groups: dict[int, str] | None = None) -> str:
    """One row per rank (a rank that never reached the rendezvous shows '?')."""
    head = ["rank", "host", "pp,tp", "address", "interface", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "device",
            "rendezvous", "peers"] + (["collectives"] if groups is not None else [])
    rows = [head]
    for r in range(world_size):
        f = facts.get(r)
        stage, tp_rank = mesh_coords(r, tp)
        address = f.endpoints.get("gloo", "none") if f else "?"
        device = (f.device + (f" ({f.versions})" if f.versions else "")) if f else "?"
        row = [str(r), f.host if f else "?", f"{stage},{tp_rank}", address,
               (f.interface_of(address) or "-") if f else "?", _var(f, "GLOO_SOCKET_IFNAME"),
               _var(f, "NCCL_SOCKET_IFNAME"), device, "ok" if f else "missing", peers.get(r, "-")]
        if groups is not None:
            row.append(groups.get(r, "-"))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def connection_fix(failure: dict, source: RankFacts, target: RankFacts) -> str:
    """The setting that fixes one failed connection, in words."""
    hi, hj, aj = source.host, target.host, failure["address"]
    var = _VAR.get(failure.get("endpoint", "gloo"), "GLOO_SOCKET_IFNAME")
    other = f"set {var} on {hj} to the interface of a network {hi} is on too ({hj} has: {target.usable_interfaces()})"
    kind = failure["kind"]
    if is_loopback(aj) and hi != hj:
        return (f"rank {failure['to']} advertises {aj}, a loopback address ({hj}'s host name resolves to it): set "
                f"{var} on {hj} to the interface that reaches rank 0 ({target.usable_interfaces()})")
    if kind == "timeout":
        where = f"on {hj}" if hi == hj else f"on {hj} or between {hi} and {hj}"
        return (f"a firewall {where} drops TCP from {source.endpoints.get('gloo', hi)} to {aj}: allow TCP between "
                "the nodes on every port (gloo and NCCL listen on ports the OS picks); or, if that is not the "
                f"network they share, {other}")
    if kind == "unreachable":
        return (f"{hi} has no route to {aj}: the link of {hi} or {hj} is down, or {aj} is on a network {hi} is not "
                f"on: bring the link up, or {other}")
    if kind in ("refused", "stranger"):
        return f"{aj} is not an address where {hi} reaches {hj}: {other}"
    return other


def problems(facts: dict[int, RankFacts], failures: list[dict], missing: list[int], master: tuple[str, int],
             timeout: float) -> list[tuple[list[str], str]]:
    """Each problem as (lines saying what failed, the fix); like failures share one fix."""
    out: list[tuple[list[str], str]] = []
    alike: dict[tuple, list[int]] = {}  # the same finding on several ranks of a host: one problem
    for f in sorted(facts):
        for found in facts[f].findings:
            alike.setdefault((found["host"], found["problem"], found["fix"]), []).append(found["rank"])
    for (host, problem, fix), ranks in alike.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        out.append(([f"{who} on {host}: {problem}"], fix))
    if missing:
        ranks = ", ".join(map(str, missing))
        out.append(([f"rank(s) {ranks} did not reach the rendezvous at {master[0]}:{master[1]} within {timeout:g}s "
                     "(their own output names their host and why)"],
                    f"from their nodes, {master[0]}:{master[1]} must accept TCP: set MESHSERVE_MASTER_ADDR to an "
                    f"address of rank 0's node that they reach, and allow TCP port {master[1]} (and {master[1] + 1}) "
                    "to it through any firewall"))
    grouped: dict[tuple, tuple[list[str], str]] = {}
    for fail in failures:
        src, dst = facts.get(fail["from"]), facts.get(fail["to"]) if fail.get("to") is not None else None
        if src is None or dst is None:
            out.append(([f"rank {fail['from']}: {fail['words']}"], "see that rank's own output"))
            continue
        line = (f"rank {fail['from']} on {src.host} ({src.endpoints.get('gloo', '?')}) cannot connect to rank "
                f"{fail['to']} on {dst.host} at {fail['address']}:{fail['port']} ({fail['endpoint']}): {fail['words']}")
        key = (src.host, dst.host, fail["kind"], fail["endpoint"])
        lines, fix = grouped.setdefault(key, ([], connection_fix(fail, src, dst)))
        lines.append(line)
    for lines, fix in grouped.values():
        if len(lines) > MAX_LINES_PER_PROBLEM:
            lines[MAX_LINES_PER_PROBLEM:] = [f"... and {len(lines) - MAX_LINES_PER_PROBLEM} more like these"]
        out.append((lines, fix))
    return out


def render(outcome, world_size: int, tp: int, master: tuple[str, int], timeout: float,
           groups: dict[int, str] | None = None, group_problems: list[tuple[list[str], str]] = ()) -> str:
    """The table and the problems below it (outcome: a mesh_check.ProbeOutcome)."""
    peers = {}
    for r in outcome.facts:
        failed = sum(1 for f in outcome.failures if f.get("from") == r)
        peers[r] = "no address" if not outcome.facts[r].probe_ports else "ok" if not failed else f"{failed} failed"
    found = problems(outcome.facts, outcome.failures, outcome.missing, master, timeout) + list(group_problems)
    nodes = len({f.host for f in outcome.facts.values()})
    text = [f"meshserve check: {world_size} rank(s) (tp={tp} x pp={world_size // tp}) on {nodes} node(s), "
            f"rendezvous {master[0]}:{master[1]}, deadline {timeout:g}s per step",
            table(world_size, tp, outcome.facts, peers, groups)]
    if found:
        text.append(f"{len(found)} problem(s):")
        for n, (lines, fix) in enumerate(found, 1):
            text.append(f"{n}. " + "\n   ".join(lines))
            text.append(f"   fix: {fix}")
    return "\n".join(text)


def rendezvous_problem(facts: RankFacts, master: tuple[str, int], error: tuple[str, str]) -> Finding:
    """A rank that cannot reach rank 0's store: what it tried, from where, and what to set."""
    from meshserve.workers.runtime.net_addr import resolve
    host, (addr, port) = facts.host, master
    via = facts.interface_of(facts.reach_from)
    where = f"{facts.reach_from} ({via}, {facts.interfaces[via]['state']})" if via else "no address that routes there"
    named = resolve(addr)
    target = f"{addr}:{port}" + (f" ({named[0]})" if named and named[0] != addr else "")
    problem = f"{host} cannot reach the rendezvous at {target} from {where}: {error[1]}"
    kind = error[0]
    if kind == "refused":
        fix = (f"nothing listens at {addr}:{port}: rank 0 did not start, or {addr} is not rank 0's node; set "
               "MESHSERVE_MASTER_ADDR to rank 0's node and MESHSERVE_MASTER_PORT to a port free there")
    elif kind == "unreachable" or (via and facts.interfaces[via]["state"] != "up"):
        fix = (f"{host} has no working route to {addr}: bring its link up, or set MESHSERVE_MASTER_ADDR to an "
               f"address of rank 0's node on a network {host} is on ({host} has: {facts.usable_interfaces()})")
    else:
        fix = (f"a firewall drops TCP from {host} to {addr}:{port}: allow TCP port {port} (and {port + 1}) on rank "
               f"0's node, or set MESHSERVE_MASTER_ADDR to an address of rank 0's node that {host} reaches")
    return Finding(facts.rank, host, problem, fix)
