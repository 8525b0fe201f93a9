"""A tokenizer for engines of a named shape, which have no real one, so that such an engine can be
served and benchmarked over HTTP (`meshserve bench serve`, grammars included) like any other.

Byte-level, as Llama 3's is: the bos and eos ids are special tokens "<ti>"; the other ids take the
256 bytes in order (any text encodes, one token per byte: there are no merges), and the ids past
them read "<ti>". Its words are as meaningless as the dummy weights.
"""
from __future__ import annotations

import json
from pathlib import Path


def _byte_chars() -> list[str]:
    """The printable character that stands for each byte in a byte-level vocabulary (GPT-2's
    convention, which tokenizers' ByteLevel decoder reverses): printable Latin-1 bytes stand for
    themselves, the others for the code points from 256 on, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_synthetic_tokenizer(out_dir: Path, vocab_size: int, bos_id: int | None, eos_id: int | None) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    special = {i for i in (bos_id, eos_id) if i is not None and 0 <= i < vocab_size}
    bytes_left = iter(_byte_chars())
    vocab = {}
    for i in range(vocab_size):
        text = None if i in special else next(bytes_left, None)
        vocab[text if text is not None else f"<t{i}>"] = i
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(f"<t{i}>", special=True, normalized=False) for i in sorted(special)])
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    for key, idx in (("bos_token", bos_id), ("eos_token", eos_id)):
        if idx in special:
            config[key] = f"<t{idx}>"
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
