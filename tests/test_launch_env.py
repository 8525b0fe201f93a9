"""Rank discovery under each launcher, the process-count and node checks, and the pre-mesh rank group
(no launcher needed: environments are given as dicts, ranks as threads)."""
from __future__ import annotations

import threading

import pytest

import meshserve.launch.rank_env as rank_env
from meshserve.launch.local_spawn import check_world_size
from meshserve.launch.rank_env import RankEnv, launched_env
from meshserve.launch.rank_sync import open_rank_group
from meshserve.errors import UserError
from tests.launchers import unused_port

SRUN_TASK = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
             "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_JOB_ID": "123456"}


def test_srun_task():
    env = launched_env(SRUN_TASK)
    assert env == RankEnv(5, 16, 5, "gpu07", 29500 + 3456, "slurm", 8)


def test_torchrun_worker():
    env = launched_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "GROUP_RANK": "1"})
    assert env == RankEnv(3, 4, 1, "node7", 29400, "torchrun", 2)


def test_batch_script_itself_is_not_a_rank():
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    assert launched_env(batch) is None


def test_overrides_and_srun_started_mpi_ranks():
    env = launched_env(SRUN_TASK | {"PMI_RANK": "5", "PMI_SIZE": "16", "MESHSERVE_MASTER_ADDR": "10.0.0.7",
                                    "MESHSERVE_MASTER_PORT": "4000"})
    assert (env.launcher, env.master_addr, env.master_port) == ("slurm", "10.0.0.7", 4000)


def test_mpirun_inside_an_allocation_uses_mpi_ranks(monkeypatch):
    monkeypatch.setattr(rank_env, "_MPI_RENDEZVOUS", ("node1", 41000))  # as if rank 0 had broadcast it
    # mpirun starts its daemons with srun: one Slurm task per node, many MPI ranks per task
    env = launched_env(SRUN_TASK | {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_RANK": "3",
                                    "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                                    "OMPI_COMM_WORLD_LOCAL_SIZE": "8"})
    assert env == RankEnv(3, 16, 3, "node1", 41000, "mpi", 8)


def test_wrong_process_count_is_reported_by_every_rank():
    """srun --kill-on-bad-exit and mpirun stop every rank once one exits non-zero: each rank prints the
    error itself, so it is in the log whichever rank exits first."""
    for rank in (0, 2):
        with pytest.raises(UserError) as err:
            check_world_size(RankEnv(rank, 3, rank, "h", 1, "mpi", 3), 4, tp=2)
        assert "start exactly 4: mpirun -np 4" in str(err.value)
        assert err.value.every_rank and not err.value.quiet


@pytest.mark.parametrize("rank,local_rank,per_node,ok", [(0, 0, 8, True), (9, 1, 8, True), (3, 3, 5, False),
                                                         (1, 0, 1, False)])
def test_tp_groups_must_stay_inside_a_node(rank, local_rank, per_node, ok):
    env = RankEnv(rank, 16, local_rank, "h", 1, "slurm", per_node)
    if ok:
        check_world_size(env, 16, tp=2)
    else:
        with pytest.raises(UserError, match="must stay inside one node"):
            check_world_size(env, 16, tp=2)


def test_under_mpi_every_rank_refuses_a_tp_group_across_nodes(monkeypatch):
    """mpirun --map-by node: rank r on node r % 2. Every rank knows every rank's node (gathered at the
    rendezvous), so even ranks whose own placement looks fine refuse, naming the first split group."""
    monkeypatch.setattr(rank_env, "_MPI_NODE_LEADS", [0, 1, 0, 1])
    for rank in range(4):
        env = RankEnv(rank, 4, rank // 2, "h", 1, "mpi", 2)
        with pytest.raises(UserError, match="ranks 0-1 .* must stay inside one node") as err:
            check_world_size(env, 4, tp=2)
        assert err.value.every_rank
    monkeypatch.setattr(rank_env, "_MPI_NODE_LEADS", [0, 0, 2, 2])  # --map-by slot: fine
    check_world_size(RankEnv(3, 4, 1, "h", 1, "mpi", 2), 4, tp=2)


def test_rank_group_agrees_and_names_the_failed_rank():
    port = unused_port()  # the group's store listens on the rendezvous port + 1
    results: dict[int, object] = {}

    def rank(r: int):
        with open_rank_group(RankEnv(r, 2, r, "127.0.0.1", port - 1, "slurm", 2)) as group:
            assert group.broadcast(41 if r == 0 else 0) == 41
            assert group.gather(10 + r) == [10, 11]
            assert group.agreed("step one", lambda: r * 2) == r * 2

            def fails():
                if r == 1:
                    raise UserError("rank one broke")
            try:
                group.agreed("step two", fails)
            except UserError as err:
                results[r] = err

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank did not finish within 60 s"
    assert str(results[1]) == "rank one broke" and results[1].every_rank and not results[1].quiet
    assert str(results[0]).startswith("rank(s) 1 of 2 failed step two") and not results[0].quiet
