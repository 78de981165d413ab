"""Corrupt checkpoints: each gets an InputError naming the file and the field or tensor, never a
traceback or a silent misread. Each case copies a tiny checkpoint and corrupts one file."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from chameleon.checkpoint import read_checkpoint
from chameleon.config import VQGANConfig
from tests.conftest import expect_error

VQ_YAML = "tokenizer/vqgan.yaml"
DD = "model.params.ddconfig."


@pytest.fixture
def copy(tiny_hf, tiny_meta, tmp_path):
    return lambda fmt: shutil.copytree(tiny_hf if fmt == "hf" else tiny_meta, tmp_path / fmt)


def set_value(file, key, value):
    """Set a dotted key in a JSON or YAML file; key None: replace the whole text with `value`."""
    if key is None:
        file.write_text(value)
        return
    load, dump = (yaml.safe_load, yaml.safe_dump) if file.suffix == ".yaml" else (json.loads, json.dumps)
    doc = load(file.read_text())
    *parents, last = key.split(".")
    node = doc
    for part in parents:
        node = node[part]
    node[last] = value
    file.write_text(dump(doc))


CONFIG_CASES = [
    # HF config.json: fields are named as in the file.
    ("hf", "config.json", "hidden_size", "64", ["'hidden_size' must be a positive integer, got '64'"]),
    ("hf", "config.json", "hidden_size", None, ["'hidden_size' must be a positive integer, got None"]),
    ("hf", "config.json", "intermediate_size", "192", ["'intermediate_size' must be a positive integer"]),
    ("hf", "config.json", "intermediate_size", 0, ["'intermediate_size' must be a positive integer"]),
    ("hf", "config.json", "intermediate_size", -192, ["'intermediate_size' must be a positive integer"]),
    ("hf", "config.json", "num_attention_heads", True, ["'num_attention_heads' must be a positive integer, got True"]),
    ("hf", "config.json", "rms_norm_eps", "1e-5", ["'rms_norm_eps' must be a positive finite number"]),
    ("hf", "config.json", "rms_norm_eps", None, ["'rms_norm_eps'"]),
    ("hf", "config.json", "rms_norm_eps", math.nan, ["'rms_norm_eps'", "got nan"]),
    ("hf", "config.json", "rope_parameters.rope_theta", "1e4", ["'rope_parameters.rope_theta'"]),
    ("hf", "config.json", "rope_parameters", [1], ["'rope_parameters' must be an object"]),
    ("hf", "config.json", "rope_parameters", "default", ["'rope_parameters' must be an object"]),
    ("hf", "config.json", "chameleon_bench", [], ["'chameleon_bench' must be an object"]),
    ("hf", "config.json", "chameleon_bench.dropout", "abc", ["'chameleon_bench.dropout' must be a number in [0, 1)"]),
    ("hf", "config.json", "chameleon_bench.dropout", None, ["'chameleon_bench.dropout'"]),
    ("hf", "config.json", "chameleon_bench.dropout", 1.0, ["'chameleon_bench.dropout'"]),
    ("hf", "config.json", "chameleon_bench.ffn_dim_multiplier", "1.0", ["'chameleon_bench.ffn_dim_multiplier'"]),
    ("hf", "config.json", "chameleon_bench.dropuot", 0.0, ["chameleon_bench", "dropuot", "did you mean 'dropout'"]),
    ("hf", "config.json", "swin_norm", "false", ["'swin_norm' must be true or false, got 'false'"]),
    ("hf", "config.json", "model_parallel_size", 0, ["'model_parallel_size' must be a positive integer, got 0"]),
    ("hf", "config.json", "vq_config", [1], ["'vq_config' must be an object"]),
    ("hf", "config.json", "vq_config.num_embeddings", "1024", ["'vq_config.num_embeddings' must be a positive integer"]),
    ("hf", "config.json", "vq_config.num_embeddings", -1, ["'vq_config.num_embeddings'"]),
    ("hf", "config.json", "vq_config.channel_multiplier", None, ["'vq_config.channel_multiplier' must be a list"]),
    ("hf", "config.json", "vq_config.channel_multiplier", [], ["'vq_config.channel_multiplier' must not be empty"]),
    ("hf", "config.json", "vq_config.channel_multiplier", 2, ["'vq_config.channel_multiplier' must be a list"]),
    ("hf", "config.json", "vq_config.base_channels", 48, ["'vq_config.base_channels' (48) must be divisible by 32"]),
    ("hf", "config.json", "vq_config.base_channels", "32", ["'vq_config.base_channels' must be a positive integer"]),
    ("hf", "config.json", "vq_config.resolution", "128", ["'vq_config.resolution' must be a positive integer"]),
    ("hf", "config.json", "vq_config.resolution", 0, ["'vq_config.resolution' must be a positive integer"]),
    ("hf", "config.json", "vq_config.resolution", 100, ["'vq_config.resolution' (100) must be divisible by", "= 8"]),
    ("hf", "config.json", "vq_config.latent_channels", -32, ["'vq_config.latent_channels'"]),
    ("hf", "config.json", "vq_config.dropout", "x", ["'vq_config.dropout' must be a number in [0, 1)"]),
    ("hf", "config.json", "vq_config.embed_dim", None, ["'vq_config.embed_dim'"]),
    ("hf", "config.json", "vq_config.double_latent", 0, ["'vq_config.double_latent' must be true or false"]),
    ("hf", "config.json", "vq_config.ch", 64, ["vq_config.base_channels", "vq_config.ch (64) are one field and disagree"]),
    ("hf", "config.json", "vq_config.out_chanels", 3, ["unknown vq_config field(s): out_chanels (did you mean 'out_channels'?)"]),
    ("hf", "config.json", "vq_config.attn_type", "linear", ["'vq_config.attn_type' is 'linear'"]),
    # Meta params.json (+ consolidate_params.json) and tokenizer/vqgan.yaml.
    ("meta", "params.json", "model", None, ["field 'model' must be an object"]),
    ("meta", "params.json", "model", [], ["field 'model' must be an object"]),
    ("meta", "consolidate_params.json", None, "[2]", ["consolidate_params.json", "expected a JSON object", "got [2]"]),
    ("meta", "consolidate_params.json", "model_parallel_size", "2", ["consolidate_params.json", "'model_parallel_size'"]),
    ("meta", "params.json", "model.norm_eps", None, ["'norm_eps' must be a positive finite number, got None"]),
    ("meta", "params.json", "model.norm_eps", "1e-5", ["'norm_eps'"]),
    ("meta", "params.json", "model.rope_theta", None, ["'rope_theta'"]),
    ("meta", "params.json", "model.rope_theta", "10000", ["'rope_theta'"]),
    ("meta", "params.json", "model.dropout", "abc", ["'dropout' must be a number in [0, 1)"]),
    ("meta", "params.json", "model.dropout", None, ["'dropout'"]),
    ("meta", "params.json", "model.ffn_dim_multiplier", "1.3", ["'ffn_dim_multiplier' must be a positive finite number or null"]),
    ("meta", "params.json", "model.ffn_dim_multiplier", -1, ["'ffn_dim_multiplier'"]),
    ("meta", "params.json", "model.qk_normalization", "yes", ["'qk_normalization' must be true or false"]),
    ("meta", "params.json", "model.swin_norm", "false", ["'swin_norm' must be true or false"]),
    ("meta", VQ_YAML, "model.params.n_embed", "1024", ["'n_embed' must be a positive integer"]),
    ("meta", VQ_YAML, "model.params.n_embed", -1, ["'n_embed'"]),
    ("meta", VQ_YAML, "model.params.embed_dim", None, ["'embed_dim'"]),
    ("meta", VQ_YAML, DD + "ch_mult", None, ["'ch_mult' must be a list"]),
    ("meta", VQ_YAML, DD + "ch_mult", [], ["'ch_mult' must not be empty"]),
    ("meta", VQ_YAML, DD + "ch_mult", 2, ["'ch_mult' must be a list"]),
    ("meta", VQ_YAML, DD + "ch", 30, ["'ch' (30) must be divisible by 32"]),
    ("meta", VQ_YAML, DD + "ch", "32", ["'ch' must be a positive integer"]),
    ("meta", VQ_YAML, DD + "resolution", "128", ["'resolution' must be a positive integer"]),
    ("meta", VQ_YAML, DD + "resolution", 0, ["'resolution'"]),
    ("meta", VQ_YAML, DD + "z_channels", -32, ["'z_channels'"]),
    ("meta", VQ_YAML, DD + "dropout", "x", ["'dropout' must be a number in [0, 1)"]),
    ("meta", VQ_YAML, DD + "chmult", [1], ["unknown field(s): chmult (did you mean 'ch_mult'?)"]),
    ("meta", VQ_YAML, "model.params.ddconfig", "x", ["model.params.ddconfig is 'x'"]),
    ("meta", VQ_YAML, None, "", ["empty file", "model.params.{embed_dim,n_embed,ddconfig}"]),
]


@pytest.mark.parametrize("fmt, file, key, value, fragments", CONFIG_CASES, ids=lambda v: repr(v)[:40])
def test_bad_config_value(copy, fmt, file, key, value, fragments):
    ckpt = copy(fmt)
    set_value(ckpt / file, key, value)
    expect_error(ckpt, file, *fragments)


def shard_hf(ckpt):
    """Split model.safetensors into two shards with an index; returns (index path, tensors per shard)."""
    weights = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, ckpt / file)
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    return index, weights, shards


def test_sharded_hf_index(copy):
    ckpt = copy("hf")
    index, weights, shards = shard_hf(ckpt)
    read_checkpoint(ckpt)  # the split itself is valid
    # A single file beside the shards: transformers would load it, this stack the shards; neither is guessed.
    save_file(weights, ckpt / "model.safetensors")
    expect_error(ckpt, "both model.safetensors and model.safetensors.index.json")
    (ckpt / "model.safetensors").unlink()
    good = index.read_text()
    index.write_text("[]")
    expect_error(ckpt, index.name, "'weight_map'")
    index.write_text(json.dumps({"weight_map": {k: 1 for k in weights}}))
    expect_error(ckpt, index.name, "'weight_map'", "shard file names")
    first, second = shards
    name = shards[first][0]
    # A second copy in the other shard, then a tensor the index does not list.
    index.write_text(good)
    save_file({**load_file(ckpt / second), name: weights[name]}, ckpt / second)
    expect_error(ckpt, second, name, f"lists it in {first}")
    save_file({k: weights[k] for k in shards[second]} | {"model.extra.weight": torch.zeros(2)}, ckpt / second)
    expect_error(ckpt, second, "model.extra.weight", "does not list it")


@pytest.mark.parametrize(
    "fmt, file, dtype",
    [("hf", "model.safetensors", torch.int32), ("hf", "vqgan_decoder.safetensors", torch.int8),
     ("meta", "consolidated.01.pth", torch.int64), ("meta", "tokenizer/vqgan.ckpt", torch.int32)],
)
def test_integer_weights(copy, fmt, file, dtype):
    ckpt = copy(fmt)
    path = ckpt / file
    if path.suffix == ".safetensors":
        weights = load_file(path)
        name = sorted(weights)[0]
        save_file({**weights, name: weights[name].to(dtype)}, path)
    else:
        sd = torch.load(path)
        inner = sd["state_dict"] if "state_dict" in sd else sd
        name = sorted(inner)[0]
        inner[name] = inner[name].to(dtype)
        torch.save(sd, path)
    expect_error(ckpt, path.name, f"tensor {name} has dtype {str(dtype).removeprefix('torch.')}", "floating-point")


@pytest.mark.parametrize(
    "hf_name, name, shape",
    [("model.layers.0.self_attn.q_proj.weight", "layers.0.attention.wq.weight", (62, 64)),
     ("model.layers.1.self_attn.k_norm.weight", "layers.1.attention.k_norm.weight", (32,))],
)
def test_hf_rope_permuted_weight_of_the_wrong_shape(copy, hf_name, name, shape):
    ckpt = copy("hf")
    save_file({**load_file(ckpt / "model.safetensors"), hf_name: torch.zeros(shape)}, ckpt / "model.safetensors")
    expect_error(ckpt, f"weight {name} has shape {shape}")


def test_meta_shards_and_vqgan_ckpt(copy):
    ckpt = copy("meta")
    shard = ckpt / "consolidated.01.pth"
    sd = torch.load(shard)
    wq = "layers.0.attention.wq.weight"
    torch.save({**sd, wq: sd[wq][:-2]}, shard)
    expect_error(ckpt, "consolidated.01.pth", wq, "consolidated.00.pth")
    torch.save(sd, shard)
    shutil.copyfile(shard, ckpt / "consolidated.pth")
    expect_error(ckpt, "consolidated.pth", "consolidated.00.pth")
    (ckpt / "consolidated.pth").unlink()
    # A shard lost or misnumbered in copying is named (the rest, read as one merged file, failed on a shape).
    shard.rename(ckpt / "consolidated.02.pth")
    expect_error(ckpt, "model_parallel_size=2", "missing consolidated.01.pth; unexpected consolidated.02.pth")
    (ckpt / "consolidated.02.pth").unlink()
    expect_error(ckpt, "model_parallel_size=2", "missing consolidated.01.pth")
    torch.save(sd, shard)

    vq = ckpt / "tokenizer" / "vqgan.ckpt"
    state = torch.load(vq)["state_dict"]
    # The GAN loss's integer BatchNorm counter is not part of the tokenizer: skipped, not an error.
    torch.save({"state_dict": {**state, "loss.discriminator.main.1.num_batches_tracked": torch.tensor(3)}}, vq)
    assert read_checkpoint(ckpt).has_decoder
    torch.save({"state_dict": list(state.values())}, vq)
    expect_error(ckpt, "vqgan.ckpt", "'state_dict' must be a dict of tensors", "got list")
    torch.save({"state_dict": {**state, "encoder.conv_in.weight": [1.0]}}, vq)
    expect_error(ckpt, "vqgan.ckpt", "encoder.conv_in.weight is a list, expected a tensor")
    # A training checkpoint's other objects are not unpickled (torch's advice, weights_only=False, is no flag here).
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, vq)
    expect_error(ckpt, "vqgan.ckpt", "holds Python objects besides tensors (e.g. argparse.Namespace)", "re-save its tensors alone")
    vq.write_bytes(b"")
    expect_error(ckpt, "vqgan.ckpt", "empty file")


def test_hf_config_as_transformers_writes_it(copy):
    """transformers' Meta -> HF converter keeps vqgan.yaml's names beside HF's in vq_config (and adds
    out_channels); fields that ChameleonConfig types `X | None` may be null. All of it loads."""
    ckpt = copy("hf")
    cfg = json.loads((ckpt / "config.json").read_text())
    vq = cfg["vq_config"]
    aliases = {"n_embed": "num_embeddings", "double_z": "double_latent", "z_channels": "latent_channels", "ch": "base_channels",
               "ch_mult": "channel_multiplier", "out_ch": "in_channels", "out_channels": "in_channels"}
    vq.update({alias: vq[name] for alias, name in aliases.items()})
    cfg.update(model_parallel_size=None, swin_norm=None, attention_bias=None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    loaded = read_checkpoint(ckpt)
    assert loaded.vq_config == read_checkpoint(copy("meta")).vq_config
    assert (loaded.args.model_parallel_size, loaded.args.swin_norm) == (1, False)
    # An alias alone is read as its field.
    del vq["base_channels"]
    vq["ch"] = 2 * vq["ch"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert VQGANConfig.from_hf(vq).ch == vq["ch"]


def test_fields_the_formats_own_loaders_ignore(copy):
    """Meta's loader reads params.json's top level, its "model" object and consolidate_params.json
    (later wins) and ignores keys that are not model fields; taming's VQGAN takes **ignore_kwargs;
    transformers keeps any key. Such keys load here too; a key that looks misspelt stays an error."""
    meta, hf = copy("meta"), copy("hf")
    expected, expected_vq = read_checkpoint(meta).args, read_checkpoint(meta).vq_config
    params = json.loads((meta / "params.json").read_text())
    params["model"].update(attn_dropout=0.1, z_loss_weight=1e-5, init_std=0.02)
    params.update(seed=1, optim={"lr": 1e-4}, model_parallel_size=expected.model_parallel_size)
    (meta / "params.json").write_text(json.dumps(params))
    (meta / "consolidate_params.json").unlink()  # the shard count now comes from params.json's top level
    set_value(meta / VQ_YAML, DD + "resamp_with_conv", True)
    set_value(meta / VQ_YAML, "model.params.image_key", "image")
    loaded = read_checkpoint(meta)
    assert (loaded.args, loaded.vq_config) == (expected, expected_vq)
    assert expected.model_parallel_size == 2
    params["model"]["swin_nrom"] = True
    (meta / "params.json").write_text(json.dumps(params))
    expect_error(meta, "params.json", "swin_nrom (did you mean 'swin_norm'?)")

    expected = read_checkpoint(hf).args
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(qk_layernorm=True, pretraining_tp=1)
    cfg["vq_config"]["resamp_with_conv"] = True
    (hf / "config.json").write_text(json.dumps(cfg))
    assert read_checkpoint(hf).args == expected
    set_value(hf / "config.json", "num_hiden_layers", 3)
    expect_error(hf, "config.json", "num_hiden_layers (did you mean 'num_hidden_layers'?)")


def test_meta_shards_of_different_dtypes(copy, tmp_path, capsys):
    """Shards merge lazily, each tensor's dtype taken from consolidated.00.pth before it is merged:
    a shard holding a tensor in another dtype is named when read, not found by an AssertionError
    halfway through writing the converted file (torch.cat would promote it)."""
    from benchmarks.cli import main

    ckpt = copy("meta")
    shard = ckpt / "consolidated.01.pth"
    sd = torch.load(shard)
    name = "output.weight"
    torch.save({**sd, name: sd[name].double()}, shard)
    expect_error(ckpt, "consolidated.01.pth", f"tensor {name} has dtype float64", "consolidated.00.pth has float32")
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "consolidated.01.pth" in capsys.readouterr().err and not (tmp_path / "out").exists()
