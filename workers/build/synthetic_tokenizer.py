"""A tokenizer for engines of a named shape, which have no real one: token i is the text "<ti>",
so such an engine can be served and benchmarked over HTTP (`meshserve bench serve`) like any other.
Its words are as meaningless as the dummy weights; text without that form encodes to token 0.
"""
from __future__ import annotations

import json
from pathlib import Path


def write_synthetic_tokenizer(out_dir: Path, vocab_size: int, bos_id: int | None, eos_id: int | None) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<t[0-9]+>"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # "<t5><t7>": decode(encode(text)) is the text
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<t0>", "model_max_length": 1 << 30}
    for key, idx in (("bos_token", bos_id), ("eos_token", eos_id)):
        if idx is not None and 0 <= idx < vocab_size:
            config[key] = f"<t{idx}>"
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
