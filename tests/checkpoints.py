"""Random tiny Llama checkpoints written with transformers, for tests."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32},
            bos_token_id=1, eos_token_id=2)
TINY_TIED = dict(TINY, num_hidden_layers=4, num_key_value_heads=4, tie_word_embeddings=True, head_dim=12,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def write_llama(path: Path, seed: int = 0, shards: int = 1, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**overrides)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger-than-default weights so layouts that mix up heads really differ
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    size = None
    if shards > 1:
        total = sum(p.numel() * 4 for p in model.parameters())
        size = f"{total // shards // 1000 + 1}KB"
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": size} if size else {}))
    return path


def write_llama_with_demo_tokenizer(path: Path, seed: int = 0, chat_template: str | None = None,
                                    **overrides) -> Path:
    """A random tiny Llama that carries the demo model's real tokenizer and its chat template (or
    `chat_template`)."""
    tok = demo_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    cfg = dict(TINY, vocab_size=len(tok), num_hidden_layers=4, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    write_llama(path, seed=seed, **(cfg | overrides))
    tok.save_pretrained(path)
    return path


def demo_tokenizer():
    """The demo model's tokenizer. Reading it out of the GGUF takes seconds; the first reader saves it
    beside the GGUF (moved into place whole, so parallel test workers never see half of it)."""
    from meshserve.orchestrator.demo_model import demo_gguf_path
    from transformers import AutoTokenizer
    gguf = demo_gguf_path()
    saved = gguf.parent / f"{gguf.stem}.tests-tokenizer"
    if not saved.is_dir():
        part = Path(tempfile.mkdtemp(dir=gguf.parent))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(part)
        try:
            os.rename(part, saved)
        except OSError:  # another worker's copy is in place
            shutil.rmtree(part)
    return AutoTokenizer.from_pretrained(saved)
