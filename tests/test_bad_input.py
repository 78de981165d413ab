"""Bad input gets a clear error naming what and where; the CLI exits 2 without a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

import chameleon
from benchmarks.cli import main
from chameleon.errors import InputError
from chameleon.generate import GenerationOptions, generate
from chameleon.tokenizer import ChameleonTokenizer, image_code_of, image_token_name
from chameleon.vqgan import open_image, preprocess
from tests.conftest import PHOTO


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    return shutil.copytree(tiny_hf, tmp_path / "ckpt")


def expect_error(path, *fragments):
    with pytest.raises(InputError) as err:
        chameleon.load(path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_not_a_checkpoint(tmp_path):
    expect_error(tmp_path / "nope", "not found")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "config.json", "params.json")


def test_missing_weights_and_tokenizer(hf_copy):
    (hf_copy / "tokenizer.json").unlink()
    expect_error(hf_copy, "tokenizer.json")
    (hf_copy / "model.safetensors").unlink()
    expect_error(hf_copy, "model.safetensors")


def test_corrupt_safetensors(hf_copy):
    data = (hf_copy / "model.safetensors").read_bytes()
    (hf_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(hf_copy, "model.safetensors", "corrupt")


def test_unknown_and_missing_keys_and_shape_mismatch(hf_copy):
    weights = load_file(hf_copy / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.extra.weight": torch.zeros(1)}, hf_copy / "model.safetensors")
    expect_error(hf_copy, "model.layers.0.self_attn.extra.weight")
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, hf_copy / "model.safetensors")
    expect_error(hf_copy, "missing weight", "layers.1.feed_forward.w3.weight")
    cfg = json.loads((hf_copy / "config.json").read_text())
    save_file(weights, hf_copy / "model.safetensors")
    cfg["intermediate_size"] = cfg["intermediate_size"] + 32
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    expect_error(hf_copy, "has shape", "feed_forward.w")


def test_unknown_and_inconsistent_config_fields(hf_copy, tiny_meta, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**cfg, "num_hiden_layers": 3}))
    expect_error(hf_copy, "num_hiden_layers")
    (hf_copy / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    expect_error(hf_copy, "divisible")
    meta = shutil.copytree(tiny_meta, tmp_path / "meta")
    params = json.loads((meta / "params.json").read_text())
    params["model"]["n_layer"] = 2
    (meta / "params.json").write_text(json.dumps(params))
    expect_error(meta, "n_layer", "did you mean 'n_layers'")


def test_corrupt_pth_and_missing_meta_files(tiny_meta, tmp_path):
    meta = shutil.copytree(tiny_meta, tmp_path / "meta")
    shard = sorted(meta.glob("consolidated*.pth"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    expect_error(meta, shard.name, "corrupt")
    meta2 = shutil.copytree(tiny_meta, tmp_path / "meta2")
    (meta2 / "tokenizer" / "vqgan.ckpt").unlink()
    expect_error(meta2, "vqgan.ckpt")


def test_tokenizer_without_image_tokens(tmp_path):
    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2}, unk_token="<s>"))
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(InputError, match="no image tokens"):
        ChameleonTokenizer.from_file(tmp_path / "t.json")


def test_image_token_mapping_on_synthetic_vocabulary():
    specials = ["<s>", "<pad>", "</s>", "<eoss>", "<racm3:break>", "<reserved08706>"]
    codes = [7, 0, 12, 3, 1, 2, 4, 5, 6, 8, 9, 10, 11]  # image tokens in shuffled id order
    vocab = {name: i for i, name in enumerate(specials)}
    for code in codes:
        vocab[image_token_name(code)] = len(vocab)
    vocab["IMGIMGnotZ"] = len(vocab)  # looks similar, is not an image token
    tok = ChameleonTokenizer(Tokenizer(models.WordLevel(vocab, unk_token="<s>")))
    assert image_code_of("IMGIMGFDZ") == 53 and image_token_name(53) == "IMGIMGFDZ"
    assert tok.n_image_codes == 13
    for code in codes:
        tid = vocab[image_token_name(code)]
        assert tok.codes_to_ids(torch.tensor([code])) == [tid]
        assert tok.ids_to_codes([tid]).tolist() == [code]
    assert not tok.is_image_token(vocab["IMGIMGnotZ"])
    assert (tok.bos_id, tok.boi_id, tok.eoi_id) == (0, 4, 3)


def test_truncated_and_unsupported_images(tmp_path):
    data = PHOTO.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cut.png"):
        open_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="text.png"):
        open_image(tmp_path / "text.png")
    with pytest.raises(InputError, match="mode"):
        preprocess(Image.new("I;16", (32, 32)))
    # Transparency is blended on white, as Meta's preprocessing does.
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert torch.allclose(preprocess(clear, 32), torch.ones(1, 3, 32, 32))


def test_prompt_longer_than_context(tiny_model):
    too_long = [tiny_model.tokenizer.bos_id] * (tiny_model.config.max_seq_len - 3)
    with pytest.raises(InputError, match="context"):
        generate(tiny_model, [too_long], GenerationOptions(max_new_tokens=8))
    with pytest.raises(InputError, match="context"):
        tiny_model(torch.tensor([too_long + [0] * 10]))


def test_cli_exits_2_without_traceback(tiny_hf, tmp_path):
    cases = [
        ["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--out", str(tmp_path / "o")],
        ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "o")],
        ["convert", str(tiny_hf), str(tiny_hf), "--to", "meta"],
    ]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "a <image> b", "--out", str(tmp_path / "o")]) == 2
