"""The installable package: one top-level name (`meshserve`) in site-packages, every module of the
fixed folders inside it, and the `meshserve` command pointing at it."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.conftest import ROOT

FOLDERS = {"orchestrator": "meshserve/orchestrator", "launch": "meshserve/launch", "workers": "meshserve/workers",
           "meshserve": "meshserve"}


def test_wheel_holds_only_meshserve(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("meshserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"meshserve", wheel.name.split("-py")[0] + ".dist-info"}
    expected = {f"{FOLDERS[p.relative_to(ROOT).parts[0]]}/{'/'.join(p.relative_to(ROOT).parts[1:])}"
                for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    assert expected and expected <= set(names), sorted(expected - set(names))
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "meshserve = meshserve.orchestrator.cli:main" in entry_points
