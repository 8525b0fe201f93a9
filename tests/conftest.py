import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter where there is no GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def meshserve(*args, check=True, timeout=900, device="cpu", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process, as a user would (CPU ranks unless device="cuda"); `env`
    adds to this process's environment."""
    env = {**os.environ, "MESHSERVE_DEVICE": device, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "meshserve", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"meshserve {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="session")
def cli():
    return meshserve


# Under `-n N --dist loadgroup` (pytest-xdist), a file's tests stay on one worker (its module fixtures
# run once), and the files that start launchers' daemons, clusters and network namespaces (one Slurm
# controller, fixed namespace names) share one worker, so no two of them run at once.
LAUNCHER_FILES = {"test_launch_slurm.py", "test_launch_mpi.py", "test_launch_ray.py", "test_launch_env.py",
                  "test_multinode.py", "test_mesh_check.py", "test_fault_launchers.py", "test_ray_restart.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("launchers" if name in LAUNCHER_FILES else name))
