"""Model configuration with Meta's `params.json` names, presets, and the mapping to HF's ChameleonConfig."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chameleon.errors import InputError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama-2 rule: 2/3 of 4*dim, optionally scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """The decoder's shape. Field names are those of Meta's `params.json` ("model" dict)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    vocab_size: int = 65536
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_normalization: bool = True
    swin_norm: bool = False
    model_parallel_size: int = 1  # number of Meta shards; each shard has its own q/k-norm
    max_seq_len: int = 4096
    dropout: float = 0.0  # residual and attention dropout, training only

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def validate(self, source: str = "model config") -> None:
        def bad(msg: str) -> InputError:
            return InputError(f"{source}: {msg}")

        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(f"field '{name}' must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0):
            raise bad(f"field 'n_kv_heads' must be a positive integer or null, got {self.n_kv_heads!r}")
        if self.dim % self.n_heads:
            raise bad(f"'dim' ({self.dim}) must be divisible by 'n_heads' ({self.n_heads})")
        if self.head_dim % 2:
            raise bad(f"head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise bad(f"'n_heads' ({self.n_heads}) must be a multiple of 'n_kv_heads' ({self.kv_heads})")
        # Meta's model-parallel layout gives each shard an equal slice of these.
        mp = self.model_parallel_size
        for what, size in (("'n_kv_heads'", self.kv_heads), ("'vocab_size'", self.vocab_size), ("'dim'", self.dim), ("the FFN width", self.ffn_hidden_dim)):
            if size % mp:
                raise bad(f"{what} ({size}) must be divisible by 'model_parallel_size' ({mp})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise bad(f"'dropout' must be in [0, 1), got {self.dropout!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise bad("'norm_eps' and 'rope_theta' must be positive")

    # --- Meta params.json -------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> "ModelArgs":
        """Build from a params.json dict. The "model" sub-dict (Meta's layout) or a flat dict.

        Unknown model fields are errors (a typo must not silently fall back to a default);
        top-level keys beside "model" are training metadata and are ignored.
        """
        model = params.get("model", params) if isinstance(params, dict) else None
        if not isinstance(model, dict):
            raise InputError(f"{source}: expected a JSON object with model fields, got {type(params).__name__}")
        return cls.from_dict(model, source)

    @classmethod
    def from_dict(cls, fields_: dict[str, Any], source: str) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields_) - known)
        if unknown:
            hints = [f"{k} (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
            raise InputError(f"{source}: unknown model field(s): {', '.join(hints)}; known fields: {', '.join(sorted(known))}")
        args = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            setattr(args, f.name, fields_.get(f.name, default))
        args.validate(source)
        return args

    def to_params(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self)}

    # --- Hugging Face ChameleonConfig ------------------------------------------------------
    def to_hf(self, vq: "VQGANConfig", vocabulary_map: dict[str, int], special_ids: dict[str, int]) -> dict[str, Any]:
        if not self.qk_normalization:
            raise InputError("HF's Chameleon always applies QK-norm: a model with qk_normalization=false cannot be saved in HF format")
        return {
            "architectures": ["ChameleonForConditionalGeneration"],
            "model_type": "chameleon",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "model_parallel_size": self.model_parallel_size,
            "swin_norm": self.swin_norm,
            "tie_word_embeddings": False,
            "bos_token_id": special_ids["bos"],
            "eos_token_id": special_ids["eos"],
            "pad_token_id": special_ids["pad"],
            "vq_config": vq.to_hf(),
            "vocabulary_map": vocabulary_map,
            "chameleon_bench": {"dropout": self.dropout, "multiple_of": self.multiple_of, "ffn_dim_multiplier": self.ffn_dim_multiplier},
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        unknown = sorted(set(cfg) - HF_KNOWN_KEYS)
        if unknown:
            raise InputError(f"{source}: unknown field(s) for a Chameleon config: {', '.join(unknown)}")
        if cfg.get("model_type", "chameleon") != "chameleon":
            raise InputError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'chameleon'")
        for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("tie_word_embeddings", False)):
            if key in cfg and cfg[key] != expected:
                raise InputError(f"{source}: field '{key}' is {cfg[key]!r}; this stack supports only {expected!r}")
        rope = cfg.get("rope_parameters") or {}
        if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise InputError(f"{source}: only default RoPE is supported (rope_scaling / rope_parameters.rope_type)")
        extra = cfg.get("chameleon_bench", {})
        try:
            fields_ = dict(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                # Meta writes no n_kv_heads for multi-head attention: keep that spelling.
                n_kv_heads=None if cfg.get("num_key_value_heads") in (None, cfg["num_attention_heads"]) else cfg["num_key_value_heads"],
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                qk_normalization=True,
                swin_norm=bool(cfg.get("swin_norm", False)),
                model_parallel_size=cfg.get("model_parallel_size", 1) or 1,
                max_seq_len=cfg.get("max_position_embeddings", 4096),
                dropout=extra.get("dropout", 0.0),
            )
        except KeyError as err:
            raise InputError(f"{source}: missing required field {err.args[0]!r}") from None
        intermediate = cfg.get("intermediate_size")
        if intermediate is None:
            raise InputError(f"{source}: missing required field 'intermediate_size'")
        fields_.update(_ffn_fields(fields_["dim"], intermediate, extra))
        return cls.from_dict(fields_, source)


def _ffn_fields(dim: int, intermediate: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Meta's config stores the FFN width as a rule; find the rule's inputs that give HF's width."""
    candidates = [
        (extra.get("multiple_of", 256), extra.get("ffn_dim_multiplier")),
        (256, None),
        (intermediate, None),
        (1, intermediate / int(8 * dim / 3)),
    ]
    for multiple_of, mult in candidates:
        if ffn_hidden_dim(dim, multiple_of, mult) == intermediate:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    raise InputError(f"config.json: intermediate_size {intermediate} cannot be expressed with Meta's FFN rule for dim {dim}")


HF_KNOWN_KEYS = {
    # ChameleonConfig's own fields
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "model_parallel_size",
    "swin_norm", "vq_config", "vocabulary_map", "mlp_bias", "image_token_id",
    # generic PretrainedConfig metadata written by save_pretrained
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "tokenizer_class", "_attn_implementation_autoset",
    # this project's extras
    "chameleon_bench",
}


@dataclass
class VQGANConfig:
    """The VQGAN image tokenizer's shape, with the names of Meta's `vqgan.yaml` (taming layout)."""

    embed_dim: int = 256
    n_embed: int = 8192
    double_z: bool = False
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def image_seq_len(self) -> int:
        return self.latent_size**2

    @classmethod
    def from_yaml_dict(cls, cfg: dict[str, Any], source: str = "vqgan.yaml") -> "VQGANConfig":
        try:
            params = cfg["model"]["params"]
            dd = dict(params["ddconfig"])
            fields_ = {"embed_dim": params["embed_dim"], "n_embed": params["n_embed"], **dd}
        except (KeyError, TypeError) as err:
            raise InputError(f"{source}: expected model.params.{{embed_dim,n_embed,ddconfig}}, missing {err}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields_) - known)
        if unknown:
            raise InputError(f"{source}: unknown VQGAN field(s): {', '.join(unknown)}")
        return cls(**fields_)

    def to_yaml_dict(self) -> dict[str, Any]:
        dd = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("embed_dim", "n_embed")}
        return {"model": {"target": "chameleon.vqgan.VQGAN", "params": {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": dd}}}

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "chameleon_vqgan",
            "embed_dim": self.embed_dim,
            "num_embeddings": self.n_embed,
            "double_latent": self.double_z,
            "latent_channels": self.z_channels,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "base_channels": self.ch,
            "channel_multiplier": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions),
            "dropout": self.dropout,
            "attn_type": "vanilla",
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "VQGANConfig":
        return cls(
            embed_dim=cfg.get("embed_dim", 256),
            n_embed=cfg.get("num_embeddings", 8192),
            double_z=cfg.get("double_latent", False),
            z_channels=cfg.get("latent_channels", 256),
            resolution=cfg.get("resolution", 512),
            in_channels=cfg.get("in_channels", 3),
            out_ch=cfg.get("in_channels", 3),
            ch=cfg.get("base_channels", 128),
            ch_mult=list(cfg.get("channel_multiplier", [1, 1, 2, 2, 4])),
            num_res_blocks=cfg.get("num_res_blocks", 2),
            attn_resolutions=list(cfg.get("attn_resolutions") or []),
            dropout=cfg.get("dropout", 0.0),
        )


PRESETS: dict[str, ModelArgs] = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, swin_norm=False),
    # Released as "30B"; 34B parameters. KV heads per the facts sheet (8, unconfirmed upstream).
    "30B": ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, swin_norm=True, model_parallel_size=4),
    # ~100M parameters with the full vocabulary: the CPU speed benchmark's shape.
    "100M": ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=None, max_seq_len=2048),
    # Tests and the demo.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=32, max_seq_len=2048),
}
PRESETS["34B"] = PRESETS["30B"]


def preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
