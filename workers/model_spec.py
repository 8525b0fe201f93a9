"""The Llama hyper-parameters every part of meshserve agrees on, read from HF or TensorRT-LLM configs."""
from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROPE_FIELDS = {"linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _number(cfg: dict, key: str, where: str, default: float | None = None) -> float:
    """cfg[key] (or `default` when absent) as a positive float; anything else, null included, is refused."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        need = f"={value!r} is not allowed" if key in cfg else " is required"
        raise UserError(f"{where}: {key}{need}: it must be a positive number")
    return float(value)


def _positive_ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _whole(cfg: dict, key: str, where: str, default: int) -> int:
    """cfg[key] (or `default` when absent) as a positive integer; anything else is refused."""
    value = _number(cfg, key, where, default)
    if value != int(value):
        raise UserError(f"{where}: {key}={cfg.get(key)!r} is not allowed: it must be a positive integer")
    return int(value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None  # {"type": "linear"|"llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model config: {name}={value!r} must be a positive integer")
        if self.head_dim % 2:
            raise UserError(f"model config: head_dim={self.head_dim} is odd; RoPE rotates pairs of dimensions, so "
                            "head_dim (or hidden_size / num_attention_heads) must be even")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model config: num_attention_heads={self.num_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"model config: rope scaling type {self.rope_scaling.get('type')!r} is not "
                            f"supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "LlamaSpec":
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise UserError(f"{where}: model_type={model_type!r} architectures={archs} is not a Llama "
                            "model; meshserve serves LlamaForCausalLM checkpoints only")
        for key in ("hidden_act",):
            if cfg.get(key, "silu") != "silu":
                raise UserError(f"{where}: {key}={cfg[key]!r} is not supported (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UserError(f"{where}: {key}=true is not supported (Llama has no biases)")
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise UserError(f"{where}: quantization_config (quant_method={method!r}) is not supported: meshserve "
                            "builds from float weights (F32, F16, BF16); use the unquantized checkpoint")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise UserError(f"{where}: missing required field(s) {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        rope.update(legacy)
        theta = rope.get("rope_theta") if rope.get("rope_theta") is not None else cfg.get("rope_theta")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"{where}: rope_scaling rope_type={rope_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        scaling = None
        if rope_type != "default":
            scaling = {"type": rope_type} | {k: _number(rope, k, f"{where}: rope_scaling ({rope_type})")
                                             for k in ROPE_FIELDS[rope_type]}
            if rope_type == "llama3":
                scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        head_dim = cfg["hidden_size"] // heads if _positive_ints(heads, cfg["hidden_size"]) else 0  # (refused)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or head_dim,
            rms_norm_eps=_number(cfg, "rms_norm_eps", where, 1e-6),
            rope_theta=_number({"rope_theta": 10000.0 if theta is None else theta}, "rope_theta", where),
            rope_scaling=scaling,
            max_position_embeddings=_whole(cfg, "max_position_embeddings", where, 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)

    # ---- TensorRT-LLM checkpoint config.json --------------------------------------------------
    def to_trtllm_config(self, dtype: str, tp: int, pp: int) -> dict:
        """TensorRT-LLM sizes its gated MLP as intermediate_size / tp, so a size tp does not divide is
        written padded (the rank files hold zero rows/columns there); vocab_size stays the real one."""
        return {
            "architecture": "LlamaForCausalLM",
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_size": self.head_dim,
            "intermediate_size": round_up(self.intermediate_size, tp),
            "hidden_act": "silu",
            "norm_epsilon": self.rms_norm_eps,
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": self.rope_theta,
            "rotary_scaling": self.rope_scaling,
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "share_embedding_table": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        }

    @classmethod
    def from_trtllm_config(cls, cfg: dict) -> "LlamaSpec":
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_size"], rms_norm_eps=cfg["norm_epsilon"], rope_theta=cfg["rotary_base"],
            rope_scaling=cfg.get("rotary_scaling"),
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(cfg.get("eos_token_id") or ()))
