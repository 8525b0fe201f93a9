"""`meshserve check CONFIG_OR_ENGINE`: can this engine's mesh form where the ranks run now?

Starts the engine's tp x pp ranks like `serve` does (local spawn, or in place under mpirun, srun,
torchrun, or `--launcher ray`), loads no weights, and on every rank: reports its host, addresses,
interface choice and device; reaches the rendezvous; probes every peer (workers/runtime/mesh_check.py);
then runs one tiny collective per group (workers/runtime/group_check.py). Every step has a deadline
(--timeout, default 5 s), so a mesh that cannot form is reported in seconds. Rank 0 prints one table
and the problems with their fixes; the exit code is 0 only when the mesh forms.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

from meshserve.errors import UserError


def layout(config: str | None, engine: str | None) -> tuple[int, int]:
    """(tp, pp) of a config (its engine need not be built) or of an engine folder."""
    if config:
        from meshserve.orchestrator.config import load_config
        cfg = load_config(config)
        return cfg.parallel.tp, cfg.parallel.pp
    if not engine:
        raise UserError("no engine given: pass --engine DIR or a config file")
    from meshserve.workers.engine_files import read_engine_meta
    meta = read_engine_meta(engine)
    return meta.tp, meta.pp


def run_check(tp: int, pp: int, timeout_s: float, ray: dict | None = None) -> None:
    """ray: the --launcher ray options (address, gpus_per_rank, cpus_per_rank), else None."""
    from meshserve.workers.runtime.mesh_check import TIMEOUT_ENV
    os.environ[TIMEOUT_ENV] = repr(float(timeout_s))  # reaches every rank, whatever starts it
    if ray is not None:
        from meshserve.launch.ray_launcher import run_ranks_on_ray
        run_ranks_on_ray(tp * pp, tp, check_rank, tp, timeout_s, **ray)
        return
    from meshserve.launch.local_spawn import run_ranks
    run_ranks(tp * pp, check_rank, tp, timeout_s, tp=tp)


def _show(env, text: str) -> None:
    if env.launcher == "ray":  # the driver prints it, without Ray's per-line prefixes
        from meshserve.launch.ray_launcher import announce
        announce(text)
    else:
        print(text, flush=True)


def check_rank(env, tp: int, timeout_s: float) -> None:
    """One rank of the check (see the module docstring)."""
    from meshserve.workers.runtime.group_check import gather_group_checks, group_problems, run_group_checks
    from meshserve.workers.runtime.mesh import MeshAddress, pick_device
    from meshserve.workers.runtime.mesh_check import MeshProbe, wait_for_rendezvous
    from meshserve.workers.runtime.mesh_report import render, rendezvous_problem
    from meshserve.workers.runtime.net_addr import IFNAME_VARS, launcher_hosts_store, rendezvous_store, use_interface
    from meshserve.workers.runtime.rank_facts import gather_facts
    spans_nodes = env.local_world_size != env.world_size
    master = (env.master_addr, env.master_port)
    before = {v: os.environ.get(v) for v in IFNAME_VARS}
    use_interface(env.master_addr, spans_nodes)
    auto = [v for v in IFNAME_VARS if os.environ.get(v) != before[v]]
    try:
        device = pick_device(MeshAddress(env.rank, env.world_size, env.local_rank, env.local_world_size,
                                         env.init_method))
    except UserError as err:
        raise UserError(f"{err}", every_rank=True) from None
    facts = gather_facts(env.rank, env.master_addr, device, auto)
    hosting = env.rank == 0 and not launcher_hosts_store()
    if not hosting:
        error = wait_for_rendezvous(env.master_addr, env.master_port, timeout_s, 3 * timeout_s)
        if error is not None:
            found = rendezvous_problem(facts, master, error)
            raise UserError(f"{found.problem}; fix: {found.fix}", every_rank=True)
    try:
        store = rendezvous_store(env.master_addr, env.master_port, env.world_size, hosting,
                                 timedelta(seconds=timeout_s), spans_nodes)
    except (RuntimeError, OSError) as err:
        raise UserError(f"{facts.host}: cannot {'open' if hosting else 'join'} the rendezvous store at "
                        f"{env.master_addr}:{env.master_port} ({str(err).splitlines()[0]}); set MESHSERVE_MASTER_ADDR "
                        "to an address of rank 0's node and MESHSERVE_MASTER_PORT to a port free there",
                        every_rank=True) from None
    probe = MeshProbe(store, env.rank, env.world_size, f"{master[0]}:{master[1]}", timeout_s)
    outcome = probe.run(facts, timeout_s)
    groups = run_group_checks(store, env.rank, env.world_size, tp, device, timeout_s) if outcome.ok else {}
    if env.rank != 0:  # rank 0 reports, and alone sets the exit code (a launcher names the rank that failed)
        probe.leave()
        _leave_groups(groups)
        return
    column, found = None, []
    if outcome.ok:
        hosts = {r: f.host for r, f in outcome.facts.items()}
        column, found = group_problems(gather_group_checks(store, env.world_size, timeout_s), env.world_size, tp,
                                       hosts, timeout_s)
    probe.leave(list(outcome.facts))
    _show(env, render(outcome, env.world_size, tp, master, timeout_s, column, found))
    _leave_groups(groups)
    if not outcome.ok or found:
        raise UserError("the mesh cannot form: see the problems above", every_rank=True)
    _show(env, f"meshserve check: ok, the mesh forms ({env.world_size} ranks)")


def _leave_groups(groups: dict[str, str]) -> None:
    """Destroy the process group when every collective finished (one stuck on a thread is left)."""
    import torch.distributed as dist
    if groups and all(v == "ok" for v in groups.values()) and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
