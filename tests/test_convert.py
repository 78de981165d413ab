"""Checkpoint conversion: HF <-> Meta round trips, shard merging, and loading in transformers."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ChameleonForConditionalGeneration

import chameleon
from benchmarks.cli import main
from chameleon.config import ModelArgs
from chameleon.convert import _split_dim, from_meta_shards, halves_to_interleaved, interleaved_to_halves
from chameleon.errors import InputError
from conftest import hf_logits

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
    assert "different q/k-norms; save with --shards 2" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()  # nothing half-written is left
    # The Python API's error names its own argument, not the CLI's flag.
    model = chameleon.load(tiny_hf)
    for shards, message in [(1, "different q/k-norms; save with shards=2,"), (3, "shards=3: a Meta checkpoint has 1 file")]:
        with pytest.raises(InputError) as err:
            model.save(tmp_path / "api", format="meta", shards=shards)
        assert message in str(err.value) and "--shards" not in str(err.value)
    assert not (tmp_path / "api").exists()


def test_shards_in_a_path_is_not_taken_for_the_api_argument(tiny_hf, tmp_path, capsys):
    """convert names the API's shards=N as --shards N in its errors, but a path holding 'shards='
    (a sweep directory, as hydra names them) is left as it is."""
    src = tmp_path / "shards=2" / "hf"
    shutil.copytree(tiny_hf, src)
    (src / "vqgan_decoder.safetensors").unlink()  # an HF checkpoint without the decoder: Meta's format needs it
    assert main(["convert", str(src), str(tmp_path / "meta"), "--to", "meta"]) == 2
    assert f"error: {src}: no VQGAN decoder weights" in capsys.readouterr().err


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
        got = ours(ids)
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-5, rtol=0)  # the image codes' too


def test_meta_to_hf_writes_the_processor_with_our_image_codes(tiny_meta, tmp_path):
    """A converted directory has what transformers' AutoProcessor needs, set for this VQGAN and Meta's
    preprocessing: on a photo, transformers' pixels and VQ codes equal ours."""
    from transformers import AutoProcessor

    from chameleon.vqgan import open_image, preprocess
    from conftest import PHOTO

    assert main(["convert", str(tiny_meta), str(tmp_path / "hf"), "--to", "hf"]) == 0
    ours = chameleon.load(tiny_meta)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_seq_length == ours.image_seq_len
    image = open_image(PHOTO)
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, preprocess(image, ours.vqgan.cfg.resolution), atol=1e-6, rtol=0)
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        codes = hf.model.get_image_tokens(pixels).flatten()
    assert codes.tolist() == ours.tokenizer.code_to_id[ours.vqgan.encode_image(image).flatten()].tolist()


def test_bf16_load_and_convert(tiny_hf, tmp_path):
    model = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    ids = torch.tensor([model.encode_prompt(TEXT)])
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert main(["convert", str(tiny_hf), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bf16"]) == 0
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    # --dtype casts the transformer alone (its help says so): the VQGAN's encoder and decoder keep fp32
    vqgan = [v for k, v in weights.items() if k.startswith("model.vqmodel.")]
    vqgan += load_file(tmp_path / "bf16" / "vqgan_decoder.safetensors").values()
    assert vqgan and all(v.dtype == torch.float32 for v in vqgan)


def test_meta_output_states_its_model_parallel_size(tiny_hf, tmp_path):
    """Meta's loader reads consolidate_params.json whatever the file count, and builds that many
    ranks: one file is a model_parallel_size 1 checkpoint, in params.json too."""
    assert main(["convert", str(tiny_hf), str(tmp_path / "meta2"), "--to", "meta"]) == 0
    assert json.loads((tmp_path / "meta2" / "consolidate_params.json").read_text()) == {"model_parallel_size": 2}
    # A model-parallel model whose shards share their q/k-norms fits one file.
    shared = tmp_path / "shared_norms"
    shutil.copytree(tiny_hf, shared)
    weights = load_file(shared / "model.safetensors")
    for key, w in weights.items():
        if key.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
            weights[key] = w[:1].expand_as(w).clone()
    save_file(weights, str(shared / "model.safetensors"), metadata={"format": "pt"})
    one = tmp_path / "one"
    assert main(["convert", str(shared), str(one), "--to", "meta", "--shards", "1"]) == 0
    assert sorted(p.name for p in one.glob("*.*")) == ["consolidate_params.json", "consolidated.pth", "params.json"]
    assert json.loads((one / "consolidate_params.json").read_text()) == {"model_parallel_size": 1}
    assert json.loads((one / "params.json").read_text())["model"]["model_parallel_size"] == 1
    ours, single = chameleon.load(shared), chameleon.load(one)
    ids = torch.tensor([ours.encode_prompt(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(single(ids), ours(ids), atol=0, rtol=0)


def test_replicated_norms_merge_exactly():
    """RMSNorm weights are copies in every shard: merging takes them as they are (the fp32 mean of
    three equal copies is not always the value), and averages only copies that differ."""
    args = ModelArgs(dim=96, n_layers=1, n_heads=3, vocab_size=96, multiple_of=96, model_parallel_size=3)
    w = torch.rand(10_000)
    assert not torch.equal(torch.stack([w] * 3).mean(0), w)
    assert torch.equal(from_meta_shards([{"norm.weight": w.clone()} for _ in range(3)], args, "test")["norm.weight"], w)
    differ = from_meta_shards([{"norm.weight": torch.full((4,), v)} for v in (1.0, 2.0, 6.0)], args, "test")
    assert torch.equal(differ["norm.weight"], torch.full((4,), 3.0))


def test_hf_checkpoint_without_vqgan_decoder_is_not_written_as_meta(tiny_hf, tmp_path, capsys):
    """Meta's loader reads vqgan.ckpt non-strictly: a missing decoder would decode with random weights."""
    encoder_only = tmp_path / "hub_like"
    shutil.copytree(tiny_hf, encoder_only)
    (encoder_only / "vqgan_decoder.safetensors").unlink()
    assert main(["convert", str(encoder_only), str(tmp_path / "meta"), "--to", "meta"]) == 2
    assert "no VQGAN decoder weights" in capsys.readouterr().err
    assert not (tmp_path / "meta").exists()


def test_unequal_model_parallel_slices_are_refused_when_written(tmp_path, capsys):
    """A vocabulary that does not split evenly (a fine-tune's added token) loads from HF, but
    cannot become equal Meta shards; one file is fine."""
    from dataclasses import replace

    from chameleon.config import preset
    from chameleon.tiny import build_tiny_model

    hf = build_tiny_model(tmp_path / "hf", "hf", args=replace(preset("tiny"), vocab_size=4097, model_parallel_size=2))
    assert chameleon.load(hf).config.vocab_size == 4097
    assert main(["convert", str(hf), str(tmp_path / "meta"), "--to", "meta"]) == 2
    assert "vocab_size (4097) does not split into 2 equal shards; save with --shards 1," in capsys.readouterr().err


def test_weight_files_get_the_umask_mode_of_other_files(tiny_hf, tmp_path):
    """safetensors writes its files 0600: every file of a conversion is as readable as config.json."""
    old = os.umask(0o027)
    try:
        assert main(["convert", str(tiny_hf), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size", "2MB"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert {"vqgan_decoder.safetensors", "config.json"} <= modes.keys()
    assert sum(name.endswith(".safetensors") for name in modes) > 2  # shards too
    assert set(modes.values()) == {0o640}, modes


def test_meta_image_placeholder_becomes_hf_image_token(tiny_meta, tmp_path):
    """Meta's tokenizer calls HF's image placeholder `<reserved08707>`; transformers looks for `<image>`
    in the tokenizer and in config.json's vocabulary_map. A converted Meta checkpoint takes images in
    transformers, with our image codes."""
    from transformers import AutoProcessor

    from chameleon.vqgan import open_image
    from conftest import PHOTO

    meta = tmp_path / "meta"
    shutil.copytree(tiny_meta, meta)
    tok_file = meta / "tokenizer" / "text_tokenizer.json"
    tok_file.write_text(tok_file.read_text().replace('"<image>"', '"<reserved08707>"'))  # as Meta ships it
    placeholder = chameleon.load(meta).tokenizer.vocab["<reserved08707>"]
    assert main(["convert", str(meta), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocabulary_map"]["<image>"] == placeholder
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == placeholder
    image = open_image(PHOTO)
    inputs = processor(text="What is this?<image>", images=[image], return_tensors="pt")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(hf(**inputs).logits).all()
        codes = hf.model.get_image_tokens(inputs["pixel_values"]).flatten()
    ours = chameleon.load(tmp_path / "hf")
    assert codes.tolist() == ours.tokenizer.code_to_id[ours.vqgan.encode_image(image).flatten()].tolist()


def _meta_model_parallel_logits(path, ids: list[int]) -> torch.Tensor:
    """Meta's model-parallel forward written out from its reference code, on the raw shard files:
    each rank embeds a slice of dim, runs its own heads with its own q/k-norm (adjacent-pair RoPE),
    and its slice of the FFN; wo/w2 outputs are summed (all-reduce), logits gathered over vocab."""
    import torch.nn.functional as F

    p = json.loads((path / "params.json").read_text())
    p = {**p, **p["model"], **json.loads((path / "consolidate_params.json").read_text())}
    shards = [torch.load(f) for f in sorted(path.glob("consolidated.*.pth"))]
    assert len(shards) == p["model_parallel_size"]
    hd = p["dim"] // p["n_heads"]
    local_q, local_kv = p["n_heads"] // len(shards), (p["n_kv_heads"] or p["n_heads"]) // len(shards)
    eps, t = p["norm_eps"], len(ids)
    angles = torch.arange(t).float()[:, None] / p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]

    def rope(x):
        return torch.view_as_real(torch.view_as_complex(x.reshape(t, -1, hd // 2, 2)) * rot).reshape(x.shape)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def attention(x, pre):
        out = 0
        for s in shards:
            q, k, v = (x @ s[pre + f"attention.{w}.weight"].T for w in ("wq", "wk", "wv"))
            q, k, v = q.view(t, local_q, hd), k.view(t, local_kv, hd), v.view(t, local_kv, hd)
            q = F.layer_norm(q, (hd,), s[pre + "attention.q_normalization.weight"], s[pre + "attention.q_normalization.bias"])
            k = F.layer_norm(k, (hd,), s[pre + "attention.k_normalization.weight"], s[pre + "attention.k_normalization.bias"])
            k, v = (z.repeat_interleave(local_q // local_kv, 1) for z in (rope(k), v))
            o = F.scaled_dot_product_attention(rope(q).transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
            out = out + o.transpose(0, 1).reshape(t, -1) @ s[pre + "attention.wo.weight"].T
        return out

    def ffn(x, pre):
        return sum((F.silu(x @ s[pre + "feed_forward.w1.weight"].T) * (x @ s[pre + "feed_forward.w3.weight"].T)) @ s[pre + "feed_forward.w2.weight"].T
                   for s in shards)

    h = torch.cat([s["tok_embeddings.weight"][ids] for s in shards], dim=-1)
    for i in range(p["n_layers"]):
        pre, s0 = f"layers.{i}.", shards[0]
        if p["swin_norm"]:
            h = h + rms(attention(h, pre), s0[pre + "attention_norm.weight"])
            h = h + rms(ffn(h, pre), s0[pre + "ffn_norm.weight"])
        else:
            h = h + attention(rms(h, s0[pre + "attention_norm.weight"]), pre)
            h = h + ffn(rms(h, s0[pre + "ffn_norm.weight"]), pre)
    h = rms(h, shards[0]["norm.weight"])
    return torch.cat([h @ s["output.weight"].T for s in shards], dim=-1)


def test_meta_shards_follow_metas_model_parallel_layout(tmp_path):
    """30B-like: 4 shards, GQA (2 query heads and 1 KV head per shard), swin_norm, a distinct q/k-norm
    per shard. The merged model's logits equal Meta's model-parallel forward on the raw files, and so
    do transformers' after conversion to HF."""
    from dataclasses import replace

    from chameleon.config import preset
    from chameleon.tiny import build_tiny_model

    args = replace(preset("tiny"), dim=64, n_heads=8, n_kv_heads=4, model_parallel_size=4, swin_norm=True)
    meta = build_tiny_model(tmp_path / "meta", "meta", args=args)
    ours = chameleon.load(meta)
    ids = ours.encode_prompt(TEXT)
    expected = _meta_model_parallel_logits(meta, ids)
    assert main(["convert", str(meta), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor([ids]))[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_logits(hf, torch.tensor([ids]))[0], expected, atol=1e-5, rtol=0)


def test_large_checkpoints_are_announced_while_they_load_and_save(tiny_hf, tmp_path, monkeypatch, capsys):
    """Reading, writing and loading a checkpoint of ANNOUNCED_FROM bytes or more says so on stderr,
    with the time it took (a 7B one keeps the user waiting); smaller ones pass unannounced."""
    from chameleon import commands

    size = commands.weights_bytes(tiny_hf)
    assert size == (tiny_hf / "model.safetensors").stat().st_size + (tiny_hf / "vqgan_decoder.safetensors").stat().st_size
    assert main(["convert", str(tiny_hf), str(tmp_path / "quiet"), "--to", "meta"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(commands, "ANNOUNCED_FROM", size // 2)  # (written: the tensors' bytes, without the files' headers)
    assert main(["convert", str(tiny_hf), str(tmp_path / "meta"), "--to", "meta"]) == 0
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # less the bars
    gb = f"({size / 1e9:.1f} GB of weights) ..."
    assert err[0] == f"reading {tiny_hf} {gb}" and re.fullmatch(rf"reading {re.escape(str(tiny_hf))}: done in \d+\.\d s", err[1])
    assert err[2].startswith(f"writing {tmp_path / 'meta'} (") and re.fullmatch(r"writing .*: done in \d+\.\d s", err[3])
    assert len(err) == 4
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "hi", "--max-new-tokens", "2", "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert f"loading {tiny_hf} {gb}\n" in err and re.search(rf"loading {re.escape(str(tiny_hf))}: done in \d+\.\d s\n", err)


def test_dtype_cast_replaces_weights_one_at_a_time(tiny_meta, tmp_path, monkeypatch):
    """--dtype frees each weight as its cast is made: a merged (in-memory) checkpoint is not held
    twice, in its old dtype and the new (cast to fp16, a 34B's merged bf16 shards: 136 GB, not 68+68)."""
    import weakref

    to, cast = torch.Tensor.to, []

    def to_once_the_cast_are_freed(t, *args, **kwargs):
        assert all(ref() is None for ref in cast), "a weight is still in memory beside its cast"
        out = to(t, *args, **kwargs)
        if out.dtype == torch.float16 and t.dtype != torch.float16 and t.ndim == 2:
            cast.append(weakref.ref(t))
        return out

    monkeypatch.setattr(torch.Tensor, "to", to_once_the_cast_are_freed)
    assert main(["convert", str(tiny_meta), str(tmp_path / "hf"), "--to", "hf", "--dtype", "fp16"]) == 0
    assert len(cast) > 0 and load_file(tmp_path / "hf" / "model.safetensors")["lm_head.weight"].dtype == torch.float16


def test_large_checkpoints_show_progress_bars_while_converted_and_saved(tiny_hf, tmp_path, monkeypatch, capsys):
    """Writing what is announced draws a bar of bytes with rate and ETA on stderr, ending full (that
    final count also in logs); Chameleon.save draws one when asked. Reading draws none: the files are
    memory-mapped and each tensor is made as it is written."""
    from chameleon import commands

    monkeypatch.setattr(commands, "ANNOUNCED_FROM", 1)
    assert main(["convert", str(tiny_hf), str(tmp_path / "meta"), "--to", "meta"]) == 0
    segments = capsys.readouterr().err.replace("\r", "\n").splitlines()
    bar = r": 100%\|[^|]*\| ([\d.]+[kMG]?)/\1 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]"  # bytes, elapsed<ETA, rate
    assert not any(s.startswith("reading hf:") for s in segments), segments
    assert any(re.fullmatch(f"writing meta{bar}", s) for s in segments), segments
    chameleon.load(tiny_hf).save(tmp_path / "saved", progress=True)
    assert any(re.fullmatch(f"writing saved{bar}", s) for s in capsys.readouterr().err.replace("\r", "\n").splitlines())


def test_meta_shards_are_merged_one_tensor_at_a_time_when_converted(tiny_hf, tmp_path, monkeypatch):
    """Merging model-parallel shards into HF format: each tensor is merged as it is written and freed
    before the next is merged, so the merged weights are never all in memory beside the shards (a
    34B's 4 shards: ~68 GB). The files are those of merging everything first."""
    import weakref

    assert main(["convert", str(tiny_hf), str(tmp_path / "meta2"), "--to", "meta", "--shards", "2"]) == 0
    cat, merged = torch.cat, []

    def cat_once_the_merged_are_freed(tensors, *args, **kwargs):
        assert all(ref() is None for ref in merged), "a merged weight is still in memory while the next is merged"
        out = cat(tensors, *args, **kwargs)
        merged.append(weakref.ref(out))
        return out

    monkeypatch.setattr(torch, "cat", cat_once_the_merged_are_freed)
    assert main(["convert", str(tmp_path / "meta2"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "meta2"), str(tmp_path / "fp16"), "--to", "hf", "--dtype", "fp16"]) == 0
    monkeypatch.undo()
    assert len(merged) > 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tiny_hf / "model.safetensors").read_bytes()
    a, b = load_file(tiny_hf / "model.safetensors"), load_file(tmp_path / "fp16" / "model.safetensors")
    assert b["lm_head.weight"].dtype == torch.float16  # (the VQGAN's weights stay fp32)
    assert a.keys() == b.keys() and all(torch.equal(a[k].to(b[k].dtype), b[k]) for k in a)


def test_safetensors_are_written_as_safetensors_writes_them(tmp_path):
    """The streaming writer's files are byte for byte save_file's (tensor order by dtype then name,
    header, padding), for every dtype a checkpoint may hold, with and without metadata."""
    from chameleon.tensor_files import write_safetensors
    from chameleon.convert import cast

    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]
    tensors = {f"w{len(dtypes) - i}": (torch.randn(3, i + 1, generator=g) * 10).to(d) for i, d in enumerate(dtypes)}
    tensors |= {"scalar": torch.tensor(2.0), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6, generator=g).t()}
    tensors |= {"view": torch.arange(40.0)[5:17].view(3, 4), "naïve": torch.ones(2)}  # (a storage's middle; UTF-8 as is)
    for metadata in (None, {}, {"format": "pt"}, {"note": "café"}):  # (one key: Rust orders several at random)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata=metadata)
        write_safetensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    floats = {k: v for k, v in tensors.items() if v.dtype == torch.float32}
    write_safetensors(cast(floats, torch.bfloat16), tmp_path / "cast.safetensors")  # made as written
    got = load_file(tmp_path / "cast.safetensors")
    assert got.keys() == floats.keys() and all(torch.equal(got[k], v.bfloat16()) for k, v in floats.items())


def test_pth_files_are_written_as_torch_save_writes_them(tmp_path, monkeypatch):
    """The streaming .pth writer's files are byte for byte torch.save's, for every dtype a
    checkpoint may hold, views (a storage's middle, two views of one storage, a transpose: their
    storages written whole, as torch.save does) and the rope.freqs buffer; lazily made tensors are
    made once each, one at a time, and written as torch.save writes them alone and contiguous. Both
    torch.load ways read them back. Without the torch APIs it streams with, torch.save itself."""
    import weakref

    from chameleon import tensor_files
    from chameleon.convert import LazyTensors, standalone
    from chameleon.model import rope_inv_freq
    from chameleon.tensor_files import write_pth

    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.uint16, torch.uint32, torch.uint64,
              torch.float8_e4m3fn, torch.float8_e5m2]
    tensors = {f"w{i}": (torch.randn(3, i + 1, generator=g) * 10).to(d) for i, d in enumerate(dtypes)}
    base = torch.arange(40.0)
    tensors |= {"scalar": torch.tensor(2.0), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6, generator=g).t(),
                "view": base[5:17].view(3, 4), "same storage": base[20:], "naïve": torch.ones(2),
                "rope.freqs": rope_inv_freq(ModelArgs(dim=64, n_heads=2))}

    def read_back(file, reference):
        for mmap in (False, True):
            got = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            assert list(got) == list(reference)
            for k, v in reference.items():
                assert got[k].dtype == v.dtype and got[k].stride() == v.stride() and torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
        assert got["view"].untyped_storage().data_ptr() == got["same storage"].untyped_storage().data_ptr()

    for streaming in (True, False):
        monkeypatch.setattr(tensor_files, "_PTH_STREAMING", streaming and tensor_files._PTH_STREAMING)
        (tmp_path / "theirs").mkdir(exist_ok=True)
        (tmp_path / "ours").mkdir(exist_ok=True)
        torch.save(tensors, tmp_path / "theirs" / "consolidated.pth")
        write_pth(tensors, tmp_path / "ours" / "consolidated.pth")
        assert (tmp_path / "ours" / "consolidated.pth").read_bytes() == (tmp_path / "theirs" / "consolidated.pth").read_bytes()
        read_back(tmp_path / "ours" / "consolidated.pth", tensors)

        made = []

        def make(name):  # each tensor made once, the one before dropped (streaming)
            assert name not in [n for n, _ in made]
            assert not streaming or all(ref() is None for _, ref in made), "a tensor written is still in memory"
            t = tensors[name].clone()  # (a copy, which the writer alone holds)
            made.append((name, weakref.ref(t)))
            return t

        lazy = LazyTensors({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}, make)
        write_pth(lazy, tmp_path / "ours" / "consolidated.pth")
        assert sorted(n for n, _ in made) == sorted(tensors)
        alone = {k: standalone(v) for k, v in tensors.items()}
        torch.save(alone, tmp_path / "theirs" / "consolidated.pth")
        assert (tmp_path / "ours" / "consolidated.pth").read_bytes() == (tmp_path / "theirs" / "consolidated.pth").read_bytes()


def test_meta_checkpoints_are_written_one_tensor_at_a_time(tiny_hf, tmp_path):
    """write_meta makes, writes and drops each tensor of a shard before making the next (torch.save
    needs a shard's all at once): HF or merged Meta shards written as Meta shards hold one tensor's
    copy at a time, not a shard's (a 34B in 2 shards: 34 GB). Replaces the shard-at-a-time test."""
    import weakref
    from dataclasses import replace

    from chameleon.checkpoint import read_checkpoint, write_meta
    from chameleon.convert import LazyTensors, specs

    assert main(["convert", str(tiny_hf), str(tmp_path / "meta2"), "--to", "meta", "--shards", "2"]) == 0
    for src in (tiny_hf, tmp_path / "meta2"):  # (the tiny model's shards differ in q/k-norms: no single file)
        ckpt = read_checkpoint(src)
        alive = []

        def make(name, weights=ckpt.weights):
            if ".q_norm." in name or ".k_norm." in name:  # (the q/k-norms are read up front, to check they fit Meta's format)
                return weights[name]
            assert all(ref() is None for ref in alive), "a tensor written is still in memory while the next is made"
            t = weights[name].clone()  # (a copy, which the writer alone holds)
            alive.append(weakref.ref(t))
            return t

        write_meta(replace(ckpt, weights=LazyTensors(specs(ckpt.weights), make)), tmp_path / "out", 2)
        assert len(alive) == 2 * sum(".q_norm." not in k and ".k_norm." not in k for k in specs(ckpt.weights))  # once a shard


def test_meta_shards_are_merged_one_tensor_at_a_time_when_loaded(tiny_hf, tmp_path, monkeypatch):
    """chameleon.load of model-parallel shards onto another device or dtype: each weight is merged,
    moved and assigned before the next is merged (a 34B onto a GPU: not ~68 GB of merged weights in
    host memory first). Here bf16 on the CPU stands for the move: the merged fp32 tensor is dropped."""
    import weakref

    assert main(["convert", str(tiny_hf), str(tmp_path / "meta2"), "--to", "meta", "--shards", "2"]) == 0
    cat, merged = torch.cat, []

    def cat_once_the_merged_are_freed(tensors, *args, **kwargs):
        if tensors[0].dtype != torch.float32:  # not a merge (the shards are fp32) but fusing q/k/v in bf16, after loading
            return cat(tensors, *args, **kwargs)
        assert all(ref() is None for ref in merged), "a merged weight is still in memory while the next is merged"
        out = cat(tensors, *args, **kwargs)
        merged.append(weakref.ref(out))
        return out

    monkeypatch.setattr(torch, "cat", cat_once_the_merged_are_freed)
    model = chameleon.load(tmp_path / "meta2", dtype=torch.bfloat16, pack_bf16=False)
    monkeypatch.undo()
    assert len(merged) > 0
    reference = chameleon.load(tiny_hf, dtype=torch.bfloat16, pack_bf16=False)
    ids = torch.tensor([reference.encode_prompt(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=0, rtol=0)
    assert {p.dtype for p in model.vqgan.parameters()} == {torch.float32}


def test_float8_weights_are_written_as_safetensors_writes_them(tiny_hf, tmp_path):
    """Checkpoints may hold any floating-point dtype, the float8 formats included (safetensors reads
    and writes F8_E4M3FNUZ, F8_E5M2FNUZ and F8_E8M0): converted, each is written where save_file
    puts it, not refused by the streaming writer with a KeyError."""
    names = ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float8_e4m3fn", "float8_e5m2"]
    dtypes = [getattr(torch, n) for n in names if hasattr(torch, n)]  # (float8_e8m0fnu: torch 2.7+)
    src = shutil.copytree(tiny_hf, tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    top = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
           "model.layers.1.input_layernorm.weight"]
    weights |= {name: weights[name].abs().to(dtype) for name, dtype in zip(top, dtypes)}  # (abs: e8m0 has no sign)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_lazy_tensors_are_not_made_to_answer_membership():
    """`name in lazy` (and `in lazy.keys()`) answers from the specs: Mapping's default __contains__
    reads the value, which for merged Meta shards is a merge of the whole tensor per question."""
    from chameleon.convert import LazyTensors

    def make(name):
        raise AssertionError(f"{name} was made to answer a membership test")

    lazy = LazyTensors({"w": torch.empty(2, 3, device="meta")}, make)
    assert "w" in lazy and "w" in lazy.keys() and "v" not in lazy and list(lazy) == ["w"]


def test_hf_checkpoints_are_permuted_one_tensor_at_a_time(tiny_hf, tmp_path, monkeypatch):
    """Reading an HF checkpoint permutes nothing into Meta's RoPE layout (q/k rows, q/k-norms): each
    tensor is permuted when read, and freed before the next is permuted when converted to Meta
    shards or back to HF, or loaded in another dtype (a 7B's q/k matrices: ~2 GB, not all at once)."""
    import weakref

    from chameleon import convert
    from chameleon.checkpoint import read_checkpoint

    permute, calls, made = convert.halves_to_interleaved, [], []

    def permute_once_the_permuted_are_freed(w, heads):
        out = permute(w, heads)
        calls.append(w.shape)
        if w.ndim == 2:  # q/k rows (norms are permuted flat, and kept by to_meta_shards, which checks them first)
            assert all(ref() is None for ref in made), "a permuted weight is still in memory while the next is permuted"
            made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(convert, "halves_to_interleaved", permute_once_the_permuted_are_freed)
    ckpt = read_checkpoint(tiny_hf)
    assert calls == [], "weights were permuted before they were read"
    name, args = "layers.1.attention.wk.weight", ckpt.args
    assert name in ckpt.weights and ckpt.nbytes and calls == []  # (answered from the specs)
    wk = ckpt.weights[name]
    assert len(calls) == 1
    hf_wk = load_file(tiny_hf / "model.safetensors")["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(wk, permute(hf_wk, args.kv_heads)) and torch.equal(interleaved_to_halves(wk, args.kv_heads), hf_wk)
    del wk, ckpt
    made.clear()
    assert main(["convert", str(tiny_hf), str(tmp_path / "meta"), "--to", "meta"]) == 0
    assert main(["convert", str(tiny_hf), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    chameleon.load(tiny_hf, dtype=torch.bfloat16, pack_bf16=False)
    monkeypatch.undo()
    assert len(made) == 2 * args.n_layers * (2 + 1 + 1)  # q and k of each layer: once per Meta shard, once for hf, for load
    reference = chameleon.load(tmp_path / "meta", dtype=torch.bfloat16, pack_bf16=False)
    model = chameleon.load(tmp_path / "hf", dtype=torch.bfloat16, pack_bf16=False)
    ids = torch.tensor([reference.encode_prompt(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=0, rtol=0)


def test_a_failed_save_leaves_nothing_half_written(tiny_hf, tmp_path):
    """Chameleon.save failing while it writes (here a real write error: a file-size limit, EFBIG)
    removes what it wrote, and the directories it made, as convert does; a directory the user made
    stays, emptied; save_checkpoint called into a directory holding files removes only its own.
    The error propagates."""
    size = (tiny_hf / "model.safetensors").stat().st_size
    code = f"""
import resource, sys
import chameleon
model = chameleon.load({str(tiny_hf)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))  # (Python ignores SIGXFSZ: writes fail with EFBIG)
from pathlib import Path
from chameleon.chameleon import save_checkpoint
for out in sys.argv[1:]:
    try:
        if out.endswith("held"):  # (save refuses a directory that holds files; the writer under it keeps them)
            save_checkpoint(model.to_checkpoint(), Path(out), "hf", model.tokenizer)
        else:
            model.save(out)
    except OSError as err:
        print(out, err.errno)
"""
    (tmp_path / "mine").mkdir()
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "notes.txt").write_text("the user's")
    targets = [tmp_path / "new" / "a" / "hf", tmp_path / "mine", tmp_path / "held"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, targets)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [x for t in targets for x in (str(t), str(errno.EFBIG))]
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    assert [p.name for p in (tmp_path / "held").iterdir()] == ["notes.txt"]


def test_meta_shards_rewritten_as_meta_shards_read_each_slice_once(tiny_hf, tmp_path):
    """Meta shards written as as many Meta shards (convert's default, e.g. to cast with --dtype):
    output shard s is source shard s's slices, each read once, not every tensor merged once per
    output shard (a 34B: 4 passes over 68 GB). The files are byte for byte those of cutting the
    merged (and cast) weights, as before."""
    from collections import Counter
    from dataclasses import replace

    from chameleon.checkpoint import read_checkpoint, write_meta
    from chameleon.convert import LazyTensors, cast

    src = tmp_path / "meta2"
    assert main(["convert", str(tiny_hf), str(src), "--to", "meta"]) == 0
    ckpt = read_checkpoint(src)
    files = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in sorted(src.glob("consolidated.*.pth"))]
    reads = Counter()

    def counted(i: int, shard: dict) -> LazyTensors:  # source shard i, counting the reads of each tensor
        return LazyTensors(shard, lambda name: reads.update([(i, name)]) or shard[name])

    for dtype in (None, torch.float16):
        weights = from_meta_shards([counted(i, s) for i, s in enumerate(files)], ckpt.args, str(src))
        reads.clear()
        write_meta(replace(ckpt, weights=cast(weights, dtype) if dtype else weights), tmp_path / f"new{dtype}")
        split = {key: n for key, n in reads.items() if _split_dim(key[1]) is not None}
        assert len(split) == 2 * sum(_split_dim(k) is not None for k in files[0]) and set(split.values()) == {1}, split
        # The files of before: the merged weights (cast) as a dict, each shard cut from them.
        merged = {k: v.to(dtype) if dtype else v for k, v in from_meta_shards(files, ckpt.args, str(src)).items()}
        write_meta(replace(ckpt, weights=merged), tmp_path / f"old{dtype}")
        names = sorted(p.relative_to(tmp_path / f"old{dtype}") for p in (tmp_path / f"old{dtype}").rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(tmp_path / f"new{dtype}") for p in (tmp_path / f"new{dtype}").rglob("*") if p.is_file())
        for name in names:
            assert (tmp_path / f"new{dtype}" / name).read_bytes() == (tmp_path / f"old{dtype}" / name).read_bytes(), name


def test_chunks_of_merged_meta_shards_are_those_of_the_merged_tensor():
    """A chunk of merged shards, made from the slices it covers, is torch.chunk's of the merged
    tensor, for any number of chunks (within a shard, across several, uneven), contiguous and alone
    in its storage (torch.save writes a view's whole storage)."""
    from chameleon.convert import chunk

    args = ModelArgs(dim=96, n_layers=1, n_heads=3, vocab_size=96, multiple_of=96, model_parallel_size=3)
    g = torch.Generator().manual_seed(0)
    shards = [{"output.weight": torch.randn(5, 4, generator=g), "tok_embeddings.weight": torch.randn(4, 5, generator=g)} for _ in range(3)]
    lazy = from_meta_shards(shards, args, "test")
    for name, dim in (("output.weight", 0), ("tok_embeddings.weight", 1)):
        merged = lazy[name]
        for chunks in range(1, 8):
            for index, expected in enumerate(torch.chunk(merged, chunks, dim)):
                got = chunk(lazy, name, chunks, dim, index)
                assert torch.equal(got, expected) and got.is_contiguous() and got.untyped_storage().nbytes() == got.nbytes


def test_a_failed_meta_write_is_an_error_naming_the_file(tiny_hf, tmp_path):
    """A .pth write failing (here a real one: a file-size limit, EFBIG) in a shard or in vqgan.ckpt:
    convert exits 2 with an error naming the file, not torch's zip writer's traceback (its
    'basic_ios::clear: iostream error' replaced by 'unexpected pos' as the writer closes), and
    removes what it wrote."""
    import resource

    for limit, file in ((600_000, "consolidated.00.pth"), (2_000_000, "vqgan.ckpt")):  # (a shard: 1.3 MB, vqgan.ckpt: 4.4 MB)
        out = tmp_path / f"meta{limit}"
        done = subprocess.run([sys.executable, "-m", "benchmarks.cli", "convert", str(tiny_hf), str(out), "--to", "meta", "--shards", "2"],
                              capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda n=limit: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.startswith(f"error: {out}: writing the checkpoint failed (") and file in done.stderr, done.stderr
        assert not out.exists()


def test_hf_checkpoints_written_as_meta_shards_permute_each_shards_rows_only(tiny_hf, tmp_path, monkeypatch):
    """HF -> Meta shards: each shard's q/k rows (whole heads, GQA's k too) are permuted into Meta's
    RoPE layout alone, not the whole matrix once per shard (N times the work, and a whole permuted
    matrix held where a shard's slice would do). The files are byte for byte those of cutting each
    shard from the whole permuted tensors, as before; any chunk of any tensor is torch.chunk's of
    the whole one, alone in its storage, also where it does not fall on head boundaries."""
    from dataclasses import replace

    from chameleon import convert
    from chameleon.checkpoint import read_checkpoint, write_meta
    from chameleon.convert import LazyTensors, chunk, specs

    ckpt = read_checkpoint(tiny_hf)
    args, weights = ckpt.args, ckpt.weights
    assert args.n_kv_heads < args.n_heads and args.model_parallel_size == 2
    permute, rows = convert.halves_to_interleaved, []

    def counted(w, heads):  # the rows of each q/k matrix permuted, and as how many heads
        if w.ndim == 2:
            rows.append((w.shape[0], heads))
        return permute(w, heads)

    monkeypatch.setattr(convert, "halves_to_interleaved", counted)
    write_meta(ckpt, tmp_path / "new", 2)
    half_q, half_k = args.n_heads // 2, args.kv_heads // 2
    assert sorted(rows) == sorted([(half_q * args.head_dim, half_q)] * 2 * args.n_layers + [(half_k * args.head_dim, half_k)] * 2 * args.n_layers)
    monkeypatch.undo()
    # Before: each shard cut from the whole permuted tensors (the same weights, without make_chunk).
    write_meta(replace(ckpt, weights=LazyTensors(specs(weights), weights.__getitem__)), tmp_path / "old", 2)
    names = sorted(p.relative_to(tmp_path / "old") for p in (tmp_path / "old").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "new") for p in (tmp_path / "new").rglob("*") if p.is_file())
    for name in names:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    for name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "layers.0.attention.q_norm.weight", "output.weight", "layers.0.feed_forward.w2.weight"):
        whole = weights[name]
        for dim in range(whole.ndim):
            for chunks in range(1, 6):  # (3 and 5 cut q/k rows inside heads)
                for index, expected in enumerate(torch.chunk(whole, chunks, dim)):
                    got = chunk(weights, name, chunks, dim, index)
                    assert torch.equal(got, expected) and got.is_contiguous() and got.untyped_storage().nbytes() == got.nbytes, (name, chunks, dim, index)
