"""Checkpoint conversion: HF <-> Meta round trips, shard merging, and loading in transformers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import ChameleonForConditionalGeneration

import chameleon
from benchmarks.cli import main
from chameleon.convert import halves_to_interleaved, interleaved_to_halves

TEXT = "Weng earns $12 an hour for babysitting."


def test_rope_permutation_round_trip():
    w = torch.randn(4 * 8, 5)
    halves = interleaved_to_halves(w, heads=4)
    assert not torch.equal(halves, w)
    assert torch.equal(halves_to_interleaved(halves, heads=4), w)
    # Meta's pair (0, 1) of head 0 sits at HF's rows (0, hd/2).
    assert torch.equal(halves[[0, 4]], w[[0, 1]])


def test_hf_meta_hf_round_trip_is_bit_exact(tiny_hf, tmp_path):
    assert main(["convert", str(tiny_hf), str(tmp_path / "meta"), "--to", "meta"]) == 0
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    for name in ("model.safetensors", "vqgan_decoder.safetensors"):
        a, b = load_file(tiny_hf / name), load_file(tmp_path / "hf" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert (tiny_hf / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()
    assert (tiny_hf / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()


def test_single_file_meta_refuses_distinct_shard_norms(tiny_hf, tmp_path, capsys):
    assert main(["convert", str(tiny_hf), str(tmp_path / "one"), "--to", "meta", "--shards", "1"]) == 2
    assert "different q/k-norms" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()  # nothing half-written is left


def test_meta_shards_merge_and_split(tiny_hf, tmp_path):
    """30B-style: two model-parallel shards, each with its own q/k-norm."""
    assert main(["convert", str(tiny_hf), str(tmp_path / "meta2"), "--to", "meta"]) == 0  # default: 2 shards
    shard0 = torch.load(tmp_path / "meta2" / "consolidated.00.pth")
    shard1 = torch.load(tmp_path / "meta2" / "consolidated.01.pth")
    assert shard0["tok_embeddings.weight"].shape[1] * 2 == chameleon.load(tiny_hf).config.dim
    assert not torch.equal(shard0["layers.0.attention.q_normalization.weight"], shard1["layers.0.attention.q_normalization.weight"])
    ours, merged = chameleon.load(tiny_hf), chameleon.load(tmp_path / "meta2")
    ids = torch.tensor([ours.encode_prompt(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ours(ids), atol=0, rtol=0)
    assert main(["convert", str(tmp_path / "meta2"), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size", "200KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    a = load_file(tiny_hf / "model.safetensors")
    b = {}
    for f in sorted((tmp_path / "hf").glob("model-*.safetensors")):
        b.update(load_file(f))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_meta_to_hf_loads_in_transformers_with_same_logits(tiny_meta, tmp_path):
    assert main(["convert", str(tiny_meta), str(tmp_path / "hf"), "--to", "hf"]) == 0
    ours = chameleon.load(tiny_meta)
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([ours.encode_prompt(TEXT)])
    with torch.no_grad():
        expected, got = hf(input_ids=ids).logits, ours(ids)
    text = ~torch.isin(torch.arange(got.shape[-1]), ours.tokenizer.code_to_id)
    torch.testing.assert_close(got[..., text], expected[..., text], atol=1e-5, rtol=0)


def test_bf16_load_and_convert(tiny_hf, tmp_path):
    model = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    ids = torch.tensor([model.encode_prompt(TEXT)])
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert main(["convert", str(tiny_hf), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bf16"]) == 0
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
