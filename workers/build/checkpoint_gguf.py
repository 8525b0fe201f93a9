"""A llama.cpp GGUF file (architecture `llama`) as a build source, with tensors in Hugging Face form."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from meshserve.errors import UserError
from meshserve.workers.build.source_shapes import check_source_shapes
from meshserve.workers.engine_layout import Piece
from meshserve.workers.model_spec import LlamaSpec

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm"}
_IGNORED = {"rope_freqs.weight"}  # turned into spec.rope_scaling instead


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor name, or None when it has none."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m[2] in _LAYER:
        return f"model.layers.{m[1]}.{_LAYER[m[2]]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m[1] in _TOP:
        return f"{_TOP[m[1]]}.weight"
    return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (per head: the two rotary halves interleaved) back to HF order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover Llama-3 rope scaling parameters from llama.cpp's per-frequency `rope_freqs` divisors.

    Only the two boundary wavelengths are identifiable, so original_max_position_embeddings is set to
    the low-frequency boundary (low_freq_factor 1, as in Llama 3); the resulting frequencies are exact.
    """
    f = np.asarray(factors, dtype=np.float64)
    factor = float(f.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if factor <= 1 or mid.sum() < 2:
        raise UserError("GGUF rope_freqs tensor does not look like Llama-3 rope scaling; convert the "
                        "Hugging Face checkpoint instead")
    smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)  # linear in 1 / wavelen
    slope, icpt = np.polyfit(1 / wavelen[mid], smooth, 1)
    low_wavelen, high_wavelen = -slope / icpt, slope / (1 - icpt)
    orig = int(round(low_wavelen))
    return {"type": "llama3", "factor": round(factor, 4), "low_freq_factor": round(orig / low_wavelen, 4),
            "high_freq_factor": round(orig / high_wavelen, 4), "original_max_position_embeddings": orig}


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from gguf import GGUFReader
            self._reader = GGUFReader(str(self.path))
        except Exception as err:  # the reader raises many kinds on a bad file
            raise UserError(f"{self.path}: not a readable GGUF file ({type(err).__name__}: {err}); "
                            "pass a llama.cpp .gguf model file") from None
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise UserError(f"{self.path}: GGUF architecture {arch!r} is not supported; meshserve "
                            "serves GGUF files of architecture 'llama' only")
        if self._meta("llama.expert_count", 0):
            raise UserError(f"{self.path}: mixture-of-experts Llama GGUF files are not supported")
        self._tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
            elif t.name not in _IGNORED:
                raise UserError(f"{self.path}: tensor {t.name} has no Llama counterpart; "
                                "only plain Llama GGUF files are supported")
        self.spec = self._spec()
        # GGUF lists a tensor's dimensions fastest-varying first: reversed, they are the torch shape
        shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in self._tensors.items()}
        check_source_shapes(self.spec, shapes, str(self.path), "the GGUF metadata")
        self._cached: tuple[str, torch.Tensor] | None = None

    def _meta(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _spec(self) -> LlamaSpec:
        need = {k: self._meta(f"llama.{k}") for k in (
            "block_count", "embedding_length", "feed_forward_length", "attention.head_count")}
        missing = [k for k, v in need.items() if v is None]
        if missing:
            raise UserError(f"{self.path}: GGUF metadata lacks llama.{', llama.'.join(missing)}")
        heads, hidden = int(need["attention.head_count"]), int(need["embedding_length"])
        head_dim = int(self._meta("llama.attention.key_length") or self._meta("llama.rope.dimension_count")
                       or hidden // heads)
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        embed = self._tensors.get("model.embed_tokens.weight")
        vocab = (self._meta("llama.vocab_size") or (len(tokens.data) if tokens else None)
                 or (int(embed.shape[-1]) if embed is not None else None))
        theta = float(self._meta("llama.rope.freq_base", 10000.0))
        eos = [self._meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return LlamaSpec(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need["feed_forward_length"]),
            num_layers=int(need["block_count"]), num_heads=heads,
            num_kv_heads=int(self._meta("llama.attention.head_count_kv") or heads), head_dim=head_dim,
            rms_norm_eps=float(f"{self._meta('llama.attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
            rope_theta=theta, rope_scaling=self._rope_scaling(head_dim, theta),
            max_position_embeddings=int(self._meta("llama.context_length", 4096)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            bos_token_id=self._meta("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)))

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self._meta("llama.rope.scaling.type", "none")
        if kind == "linear":
            factor = self._meta("llama.rope.scaling.factor")
            if not factor:
                raise UserError(f"{self.path}: linear rope scaling without llama.rope.scaling.factor")
            return {"type": "linear", "factor": float(factor)}
        if kind != "none":
            raise UserError(f"{self.path}: rope scaling type {kind!r} is not supported (only linear and "
                            "Llama-3 style); convert the Hugging Face checkpoint instead")
        freqs = next((t for t in self._reader.tensors if t.name == "rope_freqs.weight"), None)
        if freqs is None:
            return None
        return llama3_scaling_from_factors(self._dequantize(freqs), head_dim, theta)

    def _dequantize(self, t) -> np.ndarray:
        from gguf.quants import dequantize
        try:
            return dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {t.name} uses GGUF type {t.tensor_type.name}, which the "
                            "installed gguf package cannot dequantize; upgrade gguf or requantize") from None

    def _full(self, name: str) -> torch.Tensor:
        """The whole tensor in HF order and float32; the last one read is kept for further slices."""
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        if name not in self._tensors:
            raise UserError(f"{self.path}: tensor {name} is missing from the GGUF file")
        w = self._dequantize(self._tensors[name])
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, self.spec.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, self.spec.num_kv_heads)
        tensor = torch.from_numpy(np.array(w, dtype=np.float32))  # own, writable copy
        self._cached = (name, tensor)
        return tensor

    def describe(self) -> str:
        return f"GGUF checkpoint {self.path}"

    def read(self, piece: Piece) -> torch.Tensor:
        full = self._full(piece.source)
        if piece.dim is None:
            return full.clone()
        return full.narrow(piece.dim, piece.start, piece.stop - piece.start).clone()

    def save_tokenizer(self, out_dir: Path) -> bool:
        if "tokenizer.ggml.tokens" not in self._reader.fields:
            return False
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as err:
            raise UserError(f"{self.path}: could not build a tokenizer from the GGUF metadata "
                            f"({type(err).__name__}: {err})") from None
        template = self._meta("tokenizer.chat_template")
        if template and not tok.chat_template:
            tok.chat_template = template
        tok.save_pretrained(str(out_dir))
        if template and not AutoTokenizer.from_pretrained(str(out_dir)).chat_template:
            raise UserError(f"{self.path}: the chat template was lost when saving the tokenizer to "
                            f"{out_dir}; upgrade transformers")
        return True
