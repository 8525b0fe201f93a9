"""Write a random-weight Llama checkpoint of a named shape (for benchmarks): llama3-8b or tinyllama-1b.

    python benchmarks/make_llama.py llama3-8b OUT_DIR
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.big_checkpoint import write_random_llama  # noqa: E402

SHAPES = {"llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
          "tinyllama-1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)}

if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    info = write_random_llama(out, dtype=torch.bfloat16, shard_bytes=4 << 30, **SHAPES[name])
    print(f"{name}: {info['parameters'] / 1e9:.2f}B parameters written to {out}")
