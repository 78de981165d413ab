"""Config presets and the mapping between Meta's params.json and HF's ChameleonConfig."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import ChameleonConfig

from chameleon.config import PRESETS, ModelArgs, VQGANConfig, preset
from chameleon.errors import InputError


def test_presets_match_the_published_shapes():
    assert preset("7B").ffn_hidden_dim == 11008 and preset("7B").kv_heads == 32
    big = preset("34B")
    assert (big.dim, big.n_layers, big.n_heads, big.ffn_hidden_dim, big.swin_norm) == (8192, 48, 64, 22016, True)
    assert VQGANConfig().image_seq_len == 1024  # 512x512 -> 32x32 codes
    with pytest.raises(InputError, match="unknown model preset"):
        preset("13B")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_mapping_round_trip(name):
    args = preset(name)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2}
    hf_dict = args.to_hf(VQGANConfig(), vocab, {"bos": 0, "eos": 2, "pad": 1})
    assert ModelArgs.from_hf(hf_dict) == args  # our extras keep Meta's FFN rule inputs
    hf_dict.pop("chameleon_bench")
    cfg = ChameleonConfig(**hf_dict)  # transformers accepts every field we write
    back = ModelArgs.from_hf(cfg.to_dict())  # a config written by transformers alone
    assert back.ffn_hidden_dim == args.ffn_hidden_dim
    rule = ("multiple_of", "ffn_dim_multiplier")
    assert {k: v for k, v in dataclasses.asdict(back).items() if k not in rule} == {k: v for k, v in dataclasses.asdict(args).items() if k not in rule}
    assert VQGANConfig.from_hf(hf_dict["vq_config"]) == VQGANConfig()


def test_params_json_fields_are_checked():
    assert ModelArgs.from_params({"model": {"dim": 64, "n_layers": 2, "n_heads": 4}, "optim": {"lr": 1e-4}}).n_layers == 2
    with pytest.raises(InputError, match="did you mean 'n_heads'"):
        ModelArgs.from_params({"model": {"dim": 64, "n_head": 4}})
    with pytest.raises(InputError, match="n_kv_heads"):
        ModelArgs.from_params({"dim": 64, "n_heads": 4, "n_kv_heads": 3})
    with pytest.raises(InputError, match="positive integer"):
        ModelArgs.from_params({"dim": -1})
    # Each model-parallel shard's heads share one q/k-norm.
    with pytest.raises(InputError, match=r"'n_kv_heads' \(3\) must be divisible by 'model_parallel_size' \(2\)"):
        ModelArgs.from_params({"dim": 96, "n_heads": 3, "model_parallel_size": 2})
