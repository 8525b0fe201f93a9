"""Which path the GPU TP all-reduce takes by message size (the paths themselves run in the GPU tests,
tests/test_gpu.py, and `meshserve bench allreduce`)."""
import torch

from meshserve.workers.runtime.p2p_allreduce import _usable, path_for_bytes

KiB = 1 << 10


def test_path_by_size():
    one, most = 512 * KiB, 4096 * KiB
    assert path_for_bytes(8 * KiB, 2, one, most) == "one_shot"
    assert path_for_bytes(one, 2, one, most) == "one_shot"
    assert path_for_bytes(one + 32, 2, one, most) == "two_shot"
    assert path_for_bytes(one + 16, 2, one, most) == "one_shot"    # does not split into 16-byte slices
    assert path_for_bytes(most, 8, one, most) == "two_shot"
    assert path_for_bytes(most + 32, 2, one, most) == "nccl"


def test_never_on_cpu(monkeypatch):
    monkeypatch.delenv("MESHSERVE_P2P_ALLREDUCE", raising=False)
    assert not _usable(torch.device("cpu"), 2)
    monkeypatch.setenv("MESHSERVE_P2P_ALLREDUCE", "1")
    assert not _usable(torch.device("cpu"), 2)
