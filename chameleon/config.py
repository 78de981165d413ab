"""Model configuration with Meta's `params.json` names, presets, and the mapping to HF's ChameleonConfig."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

from chameleon.errors import InputError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama-2 rule: 2/3 of 4*dim, optionally scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def as_real(value: Any) -> float | None:
    """A real number as a float (numpy scalars too; +-inf for an int beyond float range), else None
    (true is no number, nor is "1e-5")."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


# A dropout rate. Every other number in these configs is a size or scale, so must be positive.
Fraction = Annotated[float, "in [0, 1)"]


def _rule(tp: Any) -> tuple[Callable[[Any], bool], str]:
    """What a field annotation accepts, as (test, description). JSON and YAML hold any type, and a
    near miss must not be misread: true is no integer, "1e-5" no number, "false" no boolean."""

    def number(v: Any) -> bool:
        return (x := as_real(v)) is not None and math.isfinite(x)

    if tp == Fraction:
        return (lambda v: number(v) and 0 <= v < 1), "a number in [0, 1)"
    if tp is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if tp is int:
        return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0), "a positive integer"
    if tp is float:
        return (lambda v: number(v) and v > 0), "a positive finite number"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        ok, what = _rule(args[0])
        return (lambda v: isinstance(v, list) and all(map(ok, v))), f"a list, each {what}"
    if type(None) in args:  # X | None
        ok, what = _rule(next(a for a in args if a is not type(None)))
        return (lambda v: v is None or ok(v)), f"{what} or null"
    raise TypeError(f"no rule for annotation {tp}")


def _check_value(value: Any, annotation: Any, name: str, source: str) -> None:
    ok, what = _rule(annotation)
    if not ok(value):
        raise InputError(f"{source}: field '{name}' must be {what}, got {value!r}")


def _unknown(keys: Any, known: set[str], source: str, what: str, foreign: bool = False) -> None:
    """A typo must not silently fall back to a default. `foreign`: a file another tool wrote (Meta's
    params.json and vqgan.yaml, HF's config.json), whose own loaders ignore fields they do not use
    (training settings, taming's **ignore_kwargs, transformers' generic metadata); there only a key
    that looks like a misspelt known field is an error, and the rest are ignored as those loaders
    ignore them: refusing them would refuse real checkpoints over fields that change nothing."""
    unknown = sorted(set(keys) - known)
    if foreign:
        unknown = [k for k in unknown if difflib.get_close_matches(k, known, 1, cutoff=MISSPELT)]
    if unknown:
        hints = [f"{k} (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
        raise InputError(f"{source}: unknown {what}: {', '.join(hints)}; known: {', '.join(sorted(known))}")


MISSPELT = 0.85  # difflib similarity above which an unknown key reads as a misspelling ('n_layer' 0.93)


def _object(value: Any, name: str, source: str) -> dict[str, Any]:
    """A JSON object; absent or null is an empty one (HF's defaults)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{source}: field '{name}' must be an object, got {value!r}")
    return value


def _check_fixed(cfg: dict[str, Any], fixed: dict[str, Any], source: str, prefix: str = "") -> None:
    for key, expected in fixed.items():
        if key in cfg and cfg[key] != expected:
            raise InputError(f"{source}: field '{prefix}{key}' is {cfg[key]!r}; this stack supports only {expected!r}")


Checked = TypeVar("Checked", bound="_Checked")


class _Checked:
    """A dataclass whose fields are checked against their annotations (see `_rule`), then for
    consistency (`_check_consistency`). `names` maps a field to its name in the file being read."""

    def __post_init__(self) -> None:
        self.validate(type(self).__name__)

    @classmethod
    def check_fields(cls, values: Any, source: str, names: dict[str, str] | None = None, foreign: bool = False) -> dict[str, Any]:
        """Names and types of some fields, as read from a file; returns the known ones (see
        `_unknown` for `foreign`)."""
        if not isinstance(values, dict):
            raise InputError(f"{source}: expected a JSON object of fields, got {values!r}")
        hints = typing.get_type_hints(cls, include_extras=True)
        names_ = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        _unknown(values, names_, source, "field(s)", foreign)
        known = {name: value for name, value in values.items() if name in names_}
        for name, value in known.items():
            _check_value(value, hints[name], (names or {}).get(name, name), source)
        return known

    @classmethod
    def from_dict(cls: type[Checked], values: dict[str, Any], source: str, names: dict[str, str] | None = None) -> Checked:
        """Absent fields take their defaults."""
        cls.check_fields(values, source, names)
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            setattr(obj, f.name, values.get(f.name, default))
        obj._check_consistency(source, names or {})
        return obj

    def validate(self, source: str, names: dict[str, str] | None = None) -> None:
        self.check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, source, names)  # type: ignore[arg-type]
        self._check_consistency(source, names or {})

    def _check_consistency(self, source: str, names: dict[str, str]) -> None:
        raise NotImplementedError


@dataclass
class ModelArgs(_Checked):
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
    dropout: Fraction = 0.0  # residual and attention dropout, training only

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def _check_consistency(self, source: str, names: dict[str, str]) -> None:
        def bad(msg: str) -> InputError:
            return InputError(f"{source}: {msg}")

        def n(field_: str) -> str:
            return f"'{names.get(field_, field_)}'"

        if self.dim % self.n_heads:
            raise bad(f"{n('dim')} ({self.dim}) must be divisible by {n('n_heads')} ({self.n_heads})")
        if self.head_dim % 2:
            raise bad(f"head dim {n('dim')}/{n('n_heads')} = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise bad(f"{n('n_heads')} ({self.n_heads}) must be a multiple of {n('n_kv_heads')} ({self.kv_heads})")
        if self.kv_heads % self.model_parallel_size:  # each shard's heads share one q/k-norm
            raise bad(f"{n('n_kv_heads')} ({self.kv_heads}) must be divisible by {n('model_parallel_size')} ({self.model_parallel_size})")

    # --- Meta params.json -------------------------------------------------------------------
    @classmethod
    def from_meta(cls, files: list[tuple[str, Any]]) -> "ModelArgs":
        """Fields as Meta's loader reads them from its (source, parsed JSON) files, params.json then
        consolidate_params.json: the top level, then a "model" object inside it, each later one
        winning. Its loader ignores keys that are not fields, so this does too unless they look
        misspelt (see `_unknown`)."""
        fields_: dict[str, Any] = {}
        for source, values in files:
            if not isinstance(values, dict):
                raise InputError(f"{source}: expected a JSON object with model fields, got {values!r}")
            model = values.get("model", {})
            if not isinstance(model, dict):
                raise InputError(f"{source}: field 'model' must be an object of model fields, got {model!r}")
            fields_.update(cls.check_fields({k: v for k, v in values.items() if k != "model"}, source, foreign=True))
            fields_.update(cls.check_fields(model, source, foreign=True))
        return cls.from_dict(fields_, " with ".join(Path(s).name if i else s for i, (s, _) in enumerate(files)))

    @classmethod
    def from_params(cls, params: Any, source: str = "params.json") -> "ModelArgs":
        return cls.from_meta([(source, params)])

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
        _unknown(cfg, HF_KNOWN_KEYS, source, "field(s) for a Chameleon config", foreign=True)
        cfg = {k: v for k, v in cfg.items() if not (v is None and k in HF_OPTIONAL)}  # null: HF's default
        _check_fixed(cfg, {"model_type": "chameleon", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}, source)
        rope = _object(cfg.get("rope_parameters"), "rope_parameters", source)
        extra = _object(cfg.get("chameleon_bench"), "chameleon_bench", source)
        _unknown(extra, {"dropout", "multiple_of", "ffn_dim_multiplier"}, source, "chameleon_bench field(s)")
        if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise InputError(f"{source}: only default RoPE is supported (rope_scaling / rope_parameters.rope_type)")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in cfg:
                raise InputError(f"{source}: missing required field {key!r}")
        names = dict(HF_NAMES)
        if "rope_theta" not in rope:  # older transformers wrote it at the top level
            names["rope_theta"] = "rope_theta"
        flat = {**cfg, **{f"rope_parameters.{k}": v for k, v in rope.items()}, **{f"chameleon_bench.{k}": v for k, v in extra.items()}}
        fields_ = {ours: flat[theirs] for ours, theirs in names.items() if theirs in flat}
        cls.check_fields(fields_, source, names)
        intermediate = cfg["intermediate_size"]
        _check_value(intermediate, int, "intermediate_size", source)
        if fields_.get("n_kv_heads") == fields_["n_heads"]:
            fields_["n_kv_heads"] = None  # Meta writes no n_kv_heads for multi-head attention: keep that spelling
        fields_.update(_ffn_fields(fields_, intermediate, source))
        return cls.from_dict(fields_, source, names)


def _ffn_fields(fields_: dict[str, Any], intermediate: int, source: str) -> dict[str, Any]:
    """Meta's config stores the FFN width as a rule; find the rule's inputs that give HF's width."""
    dim = fields_["dim"]
    candidates = [
        (fields_.get("multiple_of", 256), fields_.get("ffn_dim_multiplier")),
        (256, None),
        (intermediate, None),
        (1, intermediate / int(8 * dim / 3)),
    ]
    for multiple_of, mult in candidates:
        if ffn_hidden_dim(dim, multiple_of, mult) == intermediate:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    raise InputError(f"{source}: intermediate_size {intermediate} cannot be expressed with Meta's FFN rule for hidden_size {dim}")


# ModelArgs field: its name in HF's config.json (dotted: inside a sub-object).
HF_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_parameters.rope_theta", "swin_norm": "swin_norm", "model_parallel_size": "model_parallel_size",
    "max_seq_len": "max_position_embeddings", "dropout": "chameleon_bench.dropout",
    "multiple_of": "chameleon_bench.multiple_of", "ffn_dim_multiplier": "chameleon_bench.ffn_dim_multiplier",
}

# Generic PretrainedConfig metadata written by save_pretrained, in the config and its vq_config.
HF_META_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "tokenizer_class", "_attn_implementation_autoset",
}
# ChameleonConfig fields that transformers types `X | None`: null means its default.
HF_OPTIONAL = {"num_key_value_heads", "pad_token_id", "bos_token_id", "eos_token_id", "rope_parameters", "attention_bias",
               "attention_dropout", "model_parallel_size", "swin_norm", "vq_config", "vocabulary_map"}
HF_KNOWN_KEYS = HF_META_KEYS | {
    # ChameleonConfig's own fields
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "model_parallel_size",
    "swin_norm", "vq_config", "vocabulary_map", "mlp_bias", "image_token_id",
    # this project's extras
    "chameleon_bench",
}

# VQGANConfig field: its name in HF's vq_config (transformers' ChameleonVQVAEConfig).
HF_VQ_NAMES = {
    "embed_dim": "embed_dim", "n_embed": "num_embeddings", "double_z": "double_latent", "z_channels": "latent_channels",
    "resolution": "resolution", "in_channels": "in_channels", "ch": "base_channels", "ch_mult": "channel_multiplier",
    "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions", "dropout": "dropout",
}
# transformers' converter also keeps vqgan.yaml's names (ch, n_embed, ...) beside HF's, and adds out_channels.
HF_VQ_KNOWN_KEYS = HF_META_KEYS | set(HF_VQ_NAMES.values()) | set(HF_VQ_NAMES) | {"out_ch", "out_channels", "attn_type", "initializer_range"}

VQGAN_GROUPS = 32  # GroupNorm groups in the VQGAN (taming's): every channel count must divide by it


@dataclass
class VQGANConfig(_Checked):
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
    dropout: Fraction = 0.0

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def image_seq_len(self) -> int:
        return self.latent_size**2

    def _check_consistency(self, source: str, names: dict[str, str]) -> None:
        def n(field_: str) -> str:
            return f"'{names.get(field_, field_)}'"

        if not self.ch_mult:
            raise InputError(f"{source}: field {n('ch_mult')} must not be empty")
        # Every channel count is ch times an integer: ch divisible suffices.
        if self.ch % VQGAN_GROUPS:
            raise InputError(f"{source}: {n('ch')} ({self.ch}) must be divisible by {VQGAN_GROUPS}, the groups of the VQGAN's GroupNorm")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise InputError(f"{source}: {n('resolution')} ({self.resolution}) must be divisible by 2**(len({n('ch_mult')}) - 1) = {2 ** (len(self.ch_mult) - 1)}")

    @classmethod
    def from_yaml_dict(cls, cfg: Any, source: str = "vqgan.yaml") -> "VQGANConfig":
        def mapping(value: Any, where: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise InputError(f"{source}: expected model.params.{{embed_dim,n_embed,ddconfig}}; {where} is {value!r}")
            return value

        if cfg is None:
            raise InputError(f"{source}: empty file; expected model.params.{{embed_dim,n_embed,ddconfig}}")
        params = mapping(mapping(mapping(cfg, "the document").get("model"), "model").get("params"), "model.params")
        dd = mapping(params.get("ddconfig"), "model.params.ddconfig")
        for key in ("embed_dim", "n_embed"):
            if key not in params:
                raise InputError(f"{source}: missing model.params.{key}")
        dd = cls.check_fields(dd, source, foreign=True)  # taming's Encoder takes **ignore_kwargs
        return cls.from_dict({"embed_dim": params["embed_dim"], "n_embed": params["n_embed"], **dd}, source)

    def to_yaml_dict(self) -> dict[str, Any]:
        dd = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("embed_dim", "n_embed")}
        return {"model": {"target": "chameleon.vqgan.VQGAN", "params": {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": dd}}}

    def to_hf(self) -> dict[str, Any]:
        ours = dataclasses.asdict(self)
        out = {"model_type": "chameleon_vqgan", **{theirs: ours[k] for k, theirs in HF_VQ_NAMES.items()}, "attn_type": "vanilla"}
        if self.out_ch != self.in_channels:  # HF has one field for both; keep ours (as transformers' converter does)
            out["out_channels"] = self.out_ch
        return out

    @classmethod
    def from_hf(cls, vq: Any, source: str = "config.json") -> "VQGANConfig":
        vq = _object(vq, "vq_config", source)
        _unknown(vq, HF_VQ_KNOWN_KEYS, source, "vq_config field(s)", foreign=True)
        _check_fixed(vq, {"model_type": "chameleon_vqgan", "attn_type": "vanilla"}, source, "vq_config.")
        fields_, names = {}, {}
        for ours, theirs in {**HF_VQ_NAMES, "out_ch": "out_channels"}.items():
            spellings = [k for k in dict.fromkeys((theirs, ours)) if k in vq]  # HF's name first
            if len(spellings) == 2 and vq[spellings[0]] != vq[spellings[1]]:
                raise InputError(f"{source}: vq_config.{spellings[0]} ({vq[spellings[0]]!r}) and vq_config.{spellings[1]} "
                                 f"({vq[spellings[1]]!r}) are one field and disagree")
            if spellings:
                fields_[ours], names[ours] = vq[spellings[0]], f"vq_config.{spellings[0]}"
        if "out_ch" not in fields_ and "in_channels" in fields_:
            fields_["out_ch"], names["out_ch"] = fields_["in_channels"], "vq_config.in_channels"  # HF has one for both
        if "attn_resolutions" in fields_ and fields_["attn_resolutions"] is None:
            fields_["attn_resolutions"] = []  # HF's default
        return cls.from_dict(fields_, source, names)


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
