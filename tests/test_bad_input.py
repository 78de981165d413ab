"""Bad input gets a clear error naming what and where; the CLI exits 2 without a traceback."""

from __future__ import annotations

import errno
import importlib
import json
import re
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
from tests.conftest import PHOTO, expect_error


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    return shutil.copytree(tiny_hf, tmp_path / "ckpt")


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


def test_pth_files_legacy_format_loads_and_garbage_is_named(tiny_meta, tmp_path):
    """torch.save's legacy (non-zip) format is a valid checkpoint, read without mmap; a file that is
    neither format, or one cut or damaged anywhere, is an InputError naming it, never a traceback."""
    import chameleon

    meta = shutil.copytree(tiny_meta, tmp_path / "meta")
    shards = sorted(meta.glob("consolidated*.pth"))
    for shard in shards:
        torch.save(torch.load(shard), shard, _use_new_zipfile_serialization=False)
    assert chameleon.load(meta).fingerprint == chameleon.load(tiny_meta).fingerprint
    legacy = shards[0].read_bytes()
    for content, message in [(b"hello\n", "not a PyTorch checkpoint"), (legacy[:1], "corrupt"), (legacy[:3], "corrupt"),
                             (legacy[:30], "corrupt"), (legacy[:50], "corrupt"), (legacy[: len(legacy) // 2], "corrupt")]:
        shards[0].write_bytes(content)
        expect_error(meta, shards[0].name, message)


def denied(file, *args, **kwargs):
    """Stands in for an open the OS refuses (chmod would not stop root, who runs CI containers)."""
    raise PermissionError(13, "Permission denied", str(file))


def must_not_read(*args, **kwargs):
    raise AssertionError("the checkpoint was read")


def test_unreadable_pth_file_is_named_not_a_traceback(tiny_meta, tmp_path, monkeypatch):
    """A .pth file the user may not read is an InputError naming it (as it was while torch.load
    opened the file first), not a PermissionError traceback from the format check before it."""
    meta = shutil.copytree(tiny_meta, tmp_path / "meta")
    shard = sorted(meta.glob("consolidated*.pth"))[0]

    monkeypatch.setattr(importlib.import_module("chameleon.checkpoint"), "open", denied, raising=False)
    expect_error(meta, shard.name, "cannot read the checkpoint file (Permission denied)")


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


def test_truncated_and_unsupported_images(tmp_path, monkeypatch):
    data = PHOTO.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cut.png"):
        open_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="text.png"):
        open_image(tmp_path / "text.png")
    with monkeypatch.context() as m:
        m.setattr(Image, "open", denied)
        with pytest.raises(InputError, match=r"cut.png: cannot read the image file \(Permission denied\)"):
            open_image(tmp_path / "cut.png")
    with pytest.raises(InputError, match="mode"):
        preprocess(Image.new("I;16", (32, 32)))
    # Transparency is blended on white, as Meta's preprocessing does.
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert torch.allclose(preprocess(clear, 32), torch.ones(1, 3, 32, 32))


def test_images_checked_before_decoding(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="expected an image file, got a directory"):
        open_image(tmp_path)
    Image.new("I;16", (32, 32)).save(tmp_path / "gray16.png")
    with pytest.raises(InputError, match="gray16.png: unsupported image mode 'I;16'"):
        open_image(tmp_path / "gray16.png")
    Image.new("RGB", (2000, 10)).save(tmp_path / "thin.png")  # preprocessing would make it 102400x512
    with pytest.raises(InputError, match=r"thin.png: a 2000x10 image is too elongated"):
        open_image(tmp_path / "thin.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's bomb guard, scaled down
    with pytest.raises(InputError, match=r"big.png: image too large to decode safely \(.*\); downscale it"):
        open_image(tmp_path / "big.png")


def test_empty_images_and_unreadable_paths(tmp_path):
    """An image with no pixels (e.g. an empty crop) is named as such, not a ZeroDivisionError or a
    'too elongated' one; an OS error reading the path (here a symlink loop) is not called corrupt data."""
    for size in [(0, 0), (5, 0), (0, 7)]:
        with pytest.raises(InputError, match=rf"image: a {size[0]}x{size[1]} image has no pixels"):
            preprocess(Image.new("RGB", size))
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(InputError, match=r"loop.jpg: cannot read the image file \(Too many levels of symbolic links\)"):
        open_image(tmp_path / "loop.jpg")


def test_generation_options_must_be_finite():
    for field in ("temperature", "image_temperature", "top_p", "image_top_p", "repetition_penalty", "cfg_text_scale", "cfg_image_scale"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(InputError, match=f"^{field} must be a finite number"):
                GenerationOptions(**{field: bad})
    with pytest.raises(InputError, match=r"image_top_p must be a finite number in \(0, 1\], got 1.5"):
        GenerationOptions(image_top_p=1.5)
    for name, value in [("max_new_tokens", 3.5), ("max_new_tokens", "3"), ("top_k", 2.5), ("top_k", True)]:
        with pytest.raises(InputError, match=re.escape(f"{name} must be an integer, got {value!r}")):
            GenerationOptions(**{name: value})
    with pytest.raises(InputError, match=r"logit_bias\[3\] must be a finite number or -inf"):
        GenerationOptions(logit_bias={3: float("nan")})
    with pytest.raises(InputError, match=r"^mode 'video': expected one of text, image, interleaved$"):  # (the field, not a flag)
        GenerationOptions(mode="video")


def test_generate_checks_its_output_and_device_before_working(tiny_hf, tmp_path, capsys, monkeypatch):
    base = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--max-new-tokens", "2"]
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    assert main([*base, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot create it" in capsys.readouterr().err
    done = tmp_path / "done"
    assert main([*base, "--out", str(done)]) == 0
    before = (done / "generation.json").read_text()
    assert main([*base, "--out", str(done), "--seed", "1"]) == 2
    assert "already holds a generation" in capsys.readouterr().err and (done / "generation.json").read_text() == before
    images_only = tmp_path / "images_only"  # an earlier run's image, kept while its text went elsewhere
    images_only.mkdir()
    (images_only / "prompt_image_1.png").write_bytes(b"mine")
    assert main([*base, "--image", str(PHOTO), "--out", str(images_only)]) == 2
    assert "prompt_image_1.png" in capsys.readouterr().err and (images_only / "prompt_image_1.png").read_bytes() == b"mine"
    for device in ("bogus", "cuda:7"):
        assert main([*base, "--out", str(tmp_path / device), "--device", device]) == 2
        assert f"device '{device}'" in capsys.readouterr().err
    # No VQGAN decoder: image modes stop before generating, not after.
    encoder_only = shutil.copytree(tiny_hf, tmp_path / "encoder_only")
    (encoder_only / "vqgan_decoder.safetensors").unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(importlib.import_module("chameleon.generate"), "generate", must_not_run)
    out = tmp_path / "no_decoder"
    assert main(["generate", "--model", str(encoder_only), "--prompt", "hi", "--mode", "image", "--out", str(out)]) == 2
    assert "no VQGAN decoder" in capsys.readouterr().err and not (out / "output.txt").exists()


def test_load_checks_its_dtype_before_reading(tiny_hf, monkeypatch):
    import chameleon

    monkeypatch.setattr(importlib.import_module("chameleon.chameleon"), "read_checkpoint", must_not_read)
    for dtype in ("bf16", torch.int8, None):  # was a TypeError from .to() once every weight was read
        with pytest.raises(InputError, match=re.escape(f"dtype {dtype!r}: expected a floating-point torch.dtype")):
            chameleon.load(tiny_hf, dtype=dtype)


def test_cmyk_prompt_image_is_shown_as_the_model_sees_it(tiny_hf, tmp_path):
    Image.open(PHOTO).convert("CMYK").save(tmp_path / "cmyk.jpg")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--image", str(tmp_path / "cmyk.jpg"), "--max-new-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    assert Image.open(out / "prompt_image_1.png").mode == "RGB"


def test_convert_refuses_bad_destinations_and_flags(tiny_hf, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    for argv, message in [
        ([str(tmp_path / "file"), "--to", "meta"], "not a directory"),
        ([str(tmp_path / "file" / "sub"), "--to", "meta"], "writing the checkpoint failed"),
        ([str(tmp_path / "a"), "--to", "hf", "--max-shard-size", "infGB"], "expected a positive size"),
        ([str(tmp_path / "a"), "--to", "hf", "--max-shard-size=-5MB"], "expected a positive size"),
        ([str(tmp_path / "a"), "--to", "hf", "--max-shard-size", "0B"], "expected a positive size"),
        ([str(tmp_path / "a"), "--to", "hf", "--shards", "2"], "--shards applies to Meta output"),
        ([str(tmp_path / "a"), "--to", "meta", "--max-shard-size", "5GB"], "--max-shard-size applies to HF output"),
    ]:
        assert main(["convert", str(tiny_hf), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # --dtype is checked before the checkpoint is read (minutes for a 7B)
    monkeypatch.setattr(importlib.import_module("chameleon.checkpoint"), "read_checkpoint", must_not_read)
    assert main(["convert", str(tiny_hf), str(tmp_path / "a"), "--to", "hf", "--dtype", "garbage"]) == 2
    assert "--dtype 'garbage'" in capsys.readouterr().err
    # ... and so is --shards, against the source's config alone
    assert main(["convert", str(tiny_hf), str(tmp_path / "a"), "--to", "meta", "--shards", "3"]) == 2
    assert "--shards 3: a Meta checkpoint has 1 file or model_parallel_size=2 files" in capsys.readouterr().err
    monkeypatch.undo()

    # A failed conversion into a directory the user made leaves it there, empty.
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(importlib.import_module("chameleon.checkpoint"), "_write_safetensors_sharded", disk_full)
    (tmp_path / "mine").mkdir()
    assert main(["convert", str(tiny_hf), str(tmp_path / "mine"), "--to", "hf"]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    # ... and one that fails while writing into a new nested path removes the parents it made too.
    assert main(["convert", str(tiny_hf), str(tmp_path / "new" / "a" / "hf"), "--to", "hf"]) == 2
    assert "writing the checkpoint failed (No space left on device)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_convert_refuses_empty_arguments(tiny_hf, tmp_path, capsys, monkeypatch):
    """An empty SRC, DST or --dtype (an unset shell variable) is an error naming it: SRC and DST
    were the current directory ('.: destination exists and is not empty'), and --dtype '' kept
    the weights' dtype without a word."""
    monkeypatch.chdir(tmp_path)
    for argv, message in ((["", "a", "--to", "hf"], "error: SRC: empty path\n"),
                          ([str(tiny_hf), "", "--to", "hf"], "error: DST: empty path\n"),
                          ([str(tiny_hf), "a", "--to", "hf", "--dtype", ""],
                           "error: --dtype '': expected one of float32, fp32, bfloat16, bf16, float16, fp16\n")):
        assert main(["convert", *argv]) == 2
        assert capsys.readouterr().err == message
    assert not any(tmp_path.iterdir())


def test_prompt_longer_than_context(tiny_model):
    n = tiny_model.config.max_seq_len
    too_long = [tiny_model.tokenizer.bos_id] * (n - 3)
    with pytest.raises(InputError, match=f"^prompt of {n - 3} tokens plus 8 new tokens exceeds the model's context of {n} tokens: "
                                         "at most 3 new tokens fit after it \\(lower max_new_tokens\\), or shorten the prompt$"):
        generate(tiny_model, [too_long], GenerationOptions(max_new_tokens=8))
    codes = tiny_model.image_seq_len
    with pytest.raises(InputError, match=f"^prompt of {n - 3} tokens plus {codes + 2} new tokens exceeds the model's context of {n} tokens: "
                                         f"an image takes {codes + 2}; shorten the prompt by {codes - 1} tokens$"):
        generate(tiny_model, [too_long], GenerationOptions(mode="image"))
    with pytest.raises(InputError, match=f"^prompt of {n} tokens plus 1 new tokens exceeds the model's context of {n} tokens: "
                                         "the prompt alone fills it; shorten the prompt$"):
        generate(tiny_model, [too_long + [0] * 3], GenerationOptions(max_new_tokens=1))
    with pytest.raises(InputError, match=rf"^sequence of {n + 7} tokens is longer than the model's context \({n}\)$"):
        tiny_model(torch.tensor([too_long + [0] * 10]))


def test_generate_checks_its_prompts_are_token_ids(tiny_model):
    ids = tiny_model.encode_prompt("hi")
    for prompts, message in [
        (ids, "prompt 0: expected a list of token ids (model.encode_prompt gives one), got int"),  # one prompt, not a batch
        (["hi"], "got str"), ([torch.tensor(ids)], "got Tensor"),
        ([ids, [*ids, 4096]], "prompt 1: 4096 is not a token id: expected integers 0..4095"),  # another tokenizer's ids
        ([[*ids, -1]], "prompt 0: -1 is not a token id"), ([[*ids, 2.0]], "prompt 0: 2.0 is not a token id"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            generate(tiny_model, prompts, GenerationOptions(max_new_tokens=2))


def test_cli_exits_2_without_traceback(tiny_hf, tmp_path, capsys):
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
    assert capsys.readouterr().err == "error: --prompt has 1 '<image>' placeholder(s) but 0 image(s)\n"
    assert not (tmp_path / "o").exists()


def test_generate_errors_name_the_flags(tiny_hf, tmp_path, capsys):
    """The CLI names the flag the user typed (the Python API names GenerationOptions' fields), and
    refuses bad values before the model loads or --out is made."""
    base = ["generate", "--model", str(tmp_path / "never_loaded"), "--prompt", "hi", "--out", str(tmp_path / "out")]
    for flags, message in [
        (["--top-p", "2"], r"error: --top-p must be a finite number in \(0, 1\], got 2.0"),
        (["--image-top-p", "0"], r"error: --image-top-p must be a finite number in \(0, 1\], got 0.0"),
        (["--temperature", "nan"], r"error: --temperature must be a finite number >= 0, got nan"),
        (["--max-new-tokens", "-1"], r"error: --max-new-tokens must be >= 1, got -1"),
        (["--max-new-tokens", "0"], r"error: --max-new-tokens must be >= 1, got 0"),  # an empty generation
        (["--stop", ""], r"error: --stop must be non-empty strings .*, got \[''\]"),
        (["--dtype", "float64"], r"error: --dtype 'float64': expected one of float32, fp32, bfloat16, bf16, float16, fp16"),
        # argv bytes the locale cannot decode (a Latin-1 0xff) arrive as lone surrogates
        (["--prompt", "caf\udcff"], r"error: --prompt: not valid text .* at character 3"),
        (["--stop", "\udcff"], r"error: --stop: not valid text"),
    ]:
        assert main([*base, *flags]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_generate_errors_name_the_flags_after_loading_too(tiny_hf, tmp_path, capsys):
    """--device (checked before --out is made, as run does) and a --max-new-tokens that does not
    fit the context after the prompt: the errors name the flags, not chameleon.load's argument or
    GenerationOptions' field."""
    base = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--out", str(tmp_path / "out")]
    for flags, message in [
        (["--device", "bogus"], r"error: --device 'bogus': not a torch device"),
        (["--max-new-tokens", "2048"], r"error: prompt of 3 tokens plus 2048 new tokens exceeds the model's context of "
                                       r"2048 tokens: at most 2045 new tokens fit after it \(lower --max-new-tokens\)"),
    ]:
        assert main([*base, *flags]) == 2
        assert re.match(message, capsys.readouterr().err), flags
    assert not (tmp_path / "out").exists()


def test_dtype_names_are_one_set_everywhere(tiny_hf, tmp_path, monkeypatch):
    from chameleon.commands import DTYPES, parse_dtype

    assert {name: str(parse_dtype(name)) for name in DTYPES} == {
        "float32": "torch.float32", "fp32": "torch.float32", "bfloat16": "torch.bfloat16", "bf16": "torch.bfloat16",
        "float16": "torch.float16", "fp16": "torch.float16"}
    import chameleon

    loaded, load = [], chameleon.load

    def noting_dtype(*args, **kwargs):  # the real load (and generation): the model's dtype is noted
        model = load(*args, **kwargs)
        loaded.append(next(model.transformer.parameters()).dtype)
        return model

    monkeypatch.setattr(chameleon, "load", noting_dtype)
    argv = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--dtype", "float16", "--max-new-tokens", "2", "--out", str(tmp_path / "gen")]
    assert main(argv) == 0
    assert loaded == [torch.float16] and json.loads((tmp_path / "gen" / "generation.json").read_text())["new_tokens"] == 2
    assert main(["convert", str(tiny_hf), str(tmp_path / "fp16"), "--to", "hf", "--dtype", "float16"]) == 0
    assert load_file(tmp_path / "fp16" / "model.safetensors")["lm_head.weight"].dtype == torch.float16


def test_failed_generate_leaves_no_output_behind(tiny_hf, tmp_path, capsys):
    """A generate that fails removes the --out directories it made, and what it wrote into an existing
    one (a half-written generation would make a rerun refuse --out); what was there stays."""
    nested = tmp_path / "new" / "a" / "b"
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--out", str(nested)]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err and not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    (mine / "prompt_image_1.png").mkdir(parents=True)  # in the way of a file the generation writes
    (mine / "notes.txt").write_text("keep")
    argv = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--image", str(PHOTO), "--max-new-tokens", "2", "--out", str(mine)]
    assert main(argv) == 2
    assert re.search(r"error: --out .*mine: cannot write .*prompt_image_1.png \(Is a directory\)", capsys.readouterr().err)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "prompt_image_1.png"]
    (mine / "prompt_image_1.png").rmdir()
    assert main(argv) == 0  # the rerun is not refused for a leftover output.txt


def test_demo_refuses_a_bad_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file"), "--skip-suite"]) == 2
    assert "error: --out" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"
    assert main(["demo", "--out", str(tmp_path / "file" / "sub"), "--skip-suite"]) == 2
    assert "cannot create it" in capsys.readouterr().err

def test_demo_refuses_an_empty_out(tmp_path, capsys, monkeypatch):
    # Path("") is ".": an unset shell variable made the demo build its model and page in the working directory
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "", "--skip-suite"]) == 2
    assert "error: --out: empty path" in capsys.readouterr().err and not any(tmp_path.iterdir())


def _extra_index(ckpt):
    names = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in names}}))


def _wider_ffn(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 32}))


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


CLI_CHECKPOINT_CASES = {  # name: (format, how the copy is damaged, what the error must say)
    "missing weights": ("hf", lambda c: (c / "model.safetensors").unlink(), "no weights: expected model.safetensors"),
    "extra index file": ("hf", _extra_index, "both model.safetensors and model.safetensors.index.json"),
    "config/weights shape": ("hf", _wider_ffn, "weight layers.0.feed_forward.w2.weight has shape (64, 192), the config implies (64, 224)"),
    "unknown key": ("hf", lambda c: save_file({**load_file(c / "model.safetensors"), "model.layers.0.extra.weight": torch.zeros(1)},
                                              c / "model.safetensors"), "unexpected weight 'model.layers.0.extra.weight'"),
    "corrupt safetensors": ("hf", lambda c: _truncate(c / "model.safetensors"), "model.safetensors: corrupt or unreadable safetensors file"),
    "tokenizer without image tokens": ("hf", lambda c: Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2}, unk_token="<s>")).save(
        str(c / "tokenizer.json")), "tokenizer.json: the tokenizer has no image tokens"),
    "corrupt .pth": ("meta", lambda c: _truncate(c / "consolidated.00.pth"), "consolidated.00.pth: corrupt or unreadable PyTorch checkpoint"),
    "missing vqgan.ckpt": ("meta", lambda c: (c / "tokenizer" / "vqgan.ckpt").unlink(), "expected vqgan.yaml and vqgan.ckpt"),
}


@pytest.mark.parametrize("case", CLI_CHECKPOINT_CASES)
def test_cli_bad_checkpoint_exits_2_naming_it(case, tiny_hf, tiny_meta, tmp_path, capsys):
    """Each kind of bad checkpoint, given to generate and to convert: exit 2 with one error line
    naming the file and what was expected (any other exception would escape main: a traceback),
    and no --out or destination left behind."""
    fmt, damage, message = CLI_CHECKPOINT_CASES[case]
    ckpt = shutil.copytree(tiny_hf if fmt == "hf" else tiny_meta, tmp_path / "ckpt")
    damage(ckpt)
    for argv in (["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--out", str(tmp_path / "out")],
                 ["convert", str(ckpt), str(tmp_path / "converted"), "--to", "hf" if fmt == "meta" else "meta"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {ckpt}") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "converted").exists()


def test_cli_bad_images_and_over_long_prompt_exit_2(tiny_hf, tmp_path, capsys):
    """generate with a truncated image, a non-RGB (16-bit) one, or a prompt longer than the context:
    exit 2 naming the file (or the lengths), no traceback, no --out left behind."""
    (tmp_path / "cut.png").write_bytes(PHOTO.read_bytes()[: PHOTO.stat().st_size // 3])
    Image.new("I;16", (32, 32)).save(tmp_path / "gray16.png")
    base = ["generate", "--model", str(tiny_hf), "--out", str(tmp_path / "out")]
    for flags, message in [
        (["--prompt", "hi", "--image", str(tmp_path / "cut.png")], re.escape(f"error: --image {tmp_path / 'cut.png'}: image is truncated or corrupt")),
        (["--prompt", "hi", "--image", str(tmp_path / "gray16.png")], re.escape(f"error: --image {tmp_path / 'gray16.png'}: unsupported image mode 'I;16'")),
        (["--prompt", "Natalia sold clips. " * 600], r"error: prompt of \d+ tokens plus 256 new tokens exceeds the model's context of 2048 tokens"),
    ]:
        assert main([*base, *flags]) == 2
        assert re.match(message, capsys.readouterr().err), flags
        assert not (tmp_path / "out").exists()


def test_generate_refuses_an_unwritable_out_before_working(tiny_hf, tmp_path, capsys, monkeypatch):
    """An --out it may not write in (read-only file system, permissions) is refused before the model
    loads and generates, not after a generation that is then lost; the directory stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(importlib.import_module("chameleon.commands"), "TemporaryFile", lambda dir: denied(dir), raising=False)
    monkeypatch.setattr(chameleon, "load", must_not_read)
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "hi", "--out", str(out)]) == 2
    assert f"error: --out {out}: cannot write in it (Permission denied)" in capsys.readouterr().err
    assert out.is_dir() and not any(out.iterdir())


def test_generate_refuses_empty_paths(tiny_hf, tmp_path, capsys, monkeypatch):
    """An empty --out, --image or --model (an unset shell variable: --out "$DIR") is an error naming
    the flag, not the current directory: --out "" wrote the generation into it."""
    monkeypatch.chdir(tmp_path)
    base = ["--prompt", "hi", "--max-new-tokens", "2"]
    for argv, flag in ((["--model", str(tiny_hf), "--out", ""], "--out"),
                       (["--model", str(tiny_hf), "--image", "", "--out", "a"], "--image"),
                       (["--model", "", "--out", "b"], "--model")):
        assert main(["generate", *base, *argv]) == 2
        assert f"error: {flag}: empty path" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_field_names_become_flags_only_as_words():
    """generate's errors name GenerationOptions' fields as its flags, but a field name inside a
    path or a quoted value (a directory 'temperature-sweep') is left as it is."""
    from chameleon.commands import flags_for_fields

    err = InputError("at most 7 new tokens fit after it (lower max_new_tokens); top_p 1.5: expected a number in (0, 1]")
    assert flags_for_fields(err) == "at most 7 new tokens fit after it (lower --max-new-tokens); --top-p 1.5: expected a number in (0, 1]"
    for kept in ["runs/temperature-sweep/cat.png: not an image", "'top_k': unknown", "/data/top_p/x.json: missing"]:
        assert flags_for_fields(InputError(kept)) == kept


def test_forward_checks_its_inputs(tiny_model):
    """model(tokens, ...) names the argument at fault, not an IndexError deep in the embedding or
    RoPE table, a reshape of zero elements, or (negative ids, start_pos, positions) a silent wrap."""
    n, vocab = tiny_model.config.max_seq_len, tiny_model.config.vocab_size
    ids = torch.tensor([[0, 5, 6]])
    for kwargs, message in [
        (dict(tokens=ids[0]), "tokens: expected a (batch, seq) tensor of token ids, got a tensor of shape (3,)"),
        (dict(tokens=ids[None]), "tokens: expected a (batch, seq) tensor of token ids, got a tensor of shape (1, 1, 3)"),
        (dict(tokens=ids[:, :0]), "tokens: expected a (batch, seq) tensor of token ids, got a tensor of shape (1, 0)"),
        (dict(tokens=ids.to("meta")), "tokens: on meta, the model on cpu"),
        (dict(tokens=ids.float()), "tokens: expected integer token ids, got torch.float32"),
        (dict(tokens=ids.tolist()), "tokens: expected a (batch, seq) tensor of token ids, got list"),
        (dict(tokens=torch.tensor([[0, vocab]])), f"tokens: ids must lie in 0..{vocab - 1}, got 0..{vocab}"),
        (dict(tokens=torch.tensor([[-1, 5]])), f"tokens: ids must lie in 0..{vocab - 1}, got -1..5"),
        (dict(start_pos=-1), "start_pos: expected an integer >= 0, got -1"),
        (dict(start_pos=1.0), "start_pos: expected an integer >= 0, got 1.0"),
        (dict(valid=torch.ones(1, 3, dtype=torch.bool)), "valid: marks cache slots; pass a cache with it"),
        (dict(positions=torch.zeros(1, 4, dtype=torch.long)), "positions: expected shape (1, 3) (as tokens), got (1, 4)"),
        (dict(positions=torch.zeros(1, 3)), "positions: expected integer RoPE positions, got torch.float32"),
        (dict(positions=torch.tensor([[0, 1, n]])), f"positions: must lie in 0..{n - 1}, got 0..{n}"),
        (dict(positions=torch.tensor([[-1, 0, 1]])), f"positions: must lie in 0..{n - 1}, got -1..1"),
    ]:
        kwargs = {"tokens": ids, **kwargs}
        with pytest.raises(InputError, match="^" + re.escape(message)):
            tiny_model(**kwargs)
    cache = tiny_model.new_cache(1, 8)
    for valid, message in [(torch.ones(1, 4, dtype=torch.bool), "valid: expected shape (1, 3) (as tokens), got (1, 4)"),
                           (torch.ones(1, 3), "valid: expected a bool (or 0/1 integer) mask, got torch.float32")]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            tiny_model(ids, cache=cache, valid=valid)
    assert tiny_model(ids.int()).shape == (1, 3, vocab)  # int32 ids are ids too


def test_caches_check_their_sizes(tiny_model):
    """new_cache, copy_rows_from and model(..., cache=) name the size that does not fit, where torch
    failed in a matmul or a broadcast, or (a cache of fewer layers) copied part of a prefix silently."""
    from dataclasses import replace

    from chameleon.model import KVCache

    ids = torch.tensor([[0, 5, 6]])
    one = tiny_model.new_cache(1, 8)
    tiny_model(ids, cache=one)
    args = tiny_model.config
    fewer_layers = KVCache(replace(args, n_layers=args.n_layers - 1), 1, 8, torch.float32)
    for call, message in [
        (lambda: tiny_model.new_cache(0, 8), "batch_size: expected an integer >= 1, got 0"),
        (lambda: tiny_model.new_cache(1.5, 8), "batch_size: expected an integer >= 1, got 1.5"),
        (lambda: tiny_model.new_cache(1, 0), "max_seq_len: expected an integer >= 1 (None: the model's context), got 0"),
        (lambda: tiny_model(ids.expand(2, 3), cache=one), "cache: holds 1 row(s) but tokens have 2"),
        (lambda: tiny_model(ids, cache=fewer_layers), f"cache: made for another model: {args.n_layers - 1} layers"),
        (lambda: tiny_model(ids, cache=tiny_model.transformer.new_cache(1, 8, dtype=torch.bfloat16)),
         "cache: holds torch.bfloat16, the model computes in torch.float32"),
        (lambda: tiny_model(ids, cache="cache"), "cache: expected a KVCache (model.new_cache), got str"),
        (lambda: tiny_model.new_cache(4, 8).copy_rows_from(one, src_row=1), "src_row: expected 0..0 (the source has 1 row(s)), got 1"),
        (lambda: tiny_model.new_cache(4, 8).copy_rows_from(one, src_row=-1), "src_row: expected 0..0 (the source has 1 row(s)), got -1"),
        (lambda: tiny_model.new_cache(4, 6).copy_rows_from(one, length=7), "length: expected 0..6 (slots in both caches), got 7"),
        (lambda: tiny_model.new_cache(4, 8).copy_rows_from(one, length=-1), "length: expected 0..8 (slots in both caches), got -1"),
        (lambda: tiny_model.new_cache(4, 8).copy_rows_from(fewer_layers), f"src: a cache of another model: {args.n_layers - 1} layers"),
        (lambda: tiny_model.new_cache(4, 8).copy_rows_from(torch.zeros(3)), "src: expected a KVCache, got Tensor"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            call()


def test_generation_options_check_their_types():
    """Fields of the wrong type are named where given, not met later as a TypeError or an
    AttributeError, or (a string for compile, a float or string seed) taken silently."""
    for field, value, message in [
        ("stop_ids", 5, "stop_ids must be a list of token ids, got 5"),
        ("stop_ids", "12", "stop_ids must be a list of token ids, got '12'"),  # (not the ids '1' and '2')
        ("stop_strings", 5, "stop_strings must be non-empty strings"),
        ("seed", 1.5, "seed must be an integer, got 1.5"),
        ("seed", "1", "seed must be an integer, got '1'"),  # (it hashed as the seed 1)
        ("logit_bias", [1, 2], "logit_bias must be a dict {token id: bias}, got list"),
        ("logit_bias", None, "logit_bias must be a dict {token id: bias}, got NoneType"),
        ("compile", "no", "compile must be True, False or None (default), got 'no'"),  # ("no" compiled)
        ("progress", "yes", "progress must be True or False, got 'yes'"),
        ("graph_steps", "2", "graph_steps must be an integer >= 1 (None: off), got '2'"),
        ("graph_steps", 2.5, "graph_steps must be an integer >= 1 (None: off), got 2.5"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            GenerationOptions(**{field: value})



def test_generate_checks_its_batch_and_options(tiny_model):
    ids = tiny_model.encode_prompt("hi")
    opts = GenerationOptions(max_new_tokens=2)
    for prompts, options, message in [
        (torch.tensor([ids]), opts, "prompts: expected a list of prompts (lists of token ids), got Tensor"),
        ("hi", opts, "prompts: expected a list of prompts (lists of token ids), got str"),
        ((p for p in [ids]), opts, "prompts: expected a list of prompts (lists of token ids), got generator"),
        ([ids], {"max_new_tokens": 2}, "opts: expected GenerationOptions, got dict"),
        ([ids], None, "opts: expected GenerationOptions, got NoneType"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            generate(tiny_model, prompts, options)
    assert generate(tiny_model, ([*ids],), opts) == generate(tiny_model, [ids], opts)  # a tuple is a batch too


def test_encode_prompt_and_decode_output_check_their_input(tiny_model):
    """Bytes read as a list of ints ("got int"), None failed to iterate, a lone surrogate failed in
    the tokenizer ("TextInputSequence must be str"); ids outside the vocabulary were dropped silently."""
    vocab = tiny_model.config.vocab_size
    for segments, message in [
        (b"hi", "prompt: expected text, a PIL image or a list of them, got bytes"),
        (None, "prompt: expected text, a PIL image or a list of them, got NoneType"),
        (["a\ud800b"], "prompt segment 0: not valid text (surrogates not allowed: '\\ud800' at character 1)"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            tiny_model.encode_prompt(segments)
    for ids, message in [
        ([5, vocab], f"ids: expected token ids 0..{vocab - 1}, got {vocab}"),
        ([-1], f"ids: expected token ids 0..{vocab - 1}, got -1"),
        ([1.5], f"ids: expected token ids 0..{vocab - 1}, got 1.5"),
        ("abc", "ids: expected a list of token ids, got str"),
        (torch.tensor([[5, 6]]), "ids: expected a list of token ids, got a tensor of shape (1, 2)"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            tiny_model.decode_output(ids)
    ids = tiny_model.encode_prompt("hello", bos=False)
    assert tiny_model.decode_output(torch.tensor(ids)) == tiny_model.decode_output(ids) == ["hello"]


def test_save_checks_its_arguments(tiny_model, tmp_path):
    """shards with HF output and max_shard_bytes with Meta output were ignored silently, shards=0
    meant the default, shards="2" was refused as if not 2, and out="" saved into the current directory."""
    for kwargs, message in [
        (dict(format="hf", shards=2), "shards: applies to format='meta'; HF output is split with max_shard_bytes"),
        (dict(format="meta", max_shard_bytes=100), "max_shard_bytes: applies to format='hf'; Meta output is split with shards"),
        (dict(format="meta", shards=0), "shards: expected an integer >= 1, got 0"),
        (dict(format="meta", shards="2"), "shards: expected an integer >= 1, got '2'"),
        (dict(format="hf", max_shard_bytes=0), "max_shard_bytes: expected an integer >= 1, got 0"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message)):
            tiny_model.save(tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="^out: empty path$"):
        tiny_model.save("")


def test_load_names_an_empty_or_missing_path():
    """chameleon.load("") read the current directory ('. : not a checkpoint directory'); None failed in pathlib."""
    with pytest.raises(InputError, match=r"^path: empty path$"):
        chameleon.load("")
    with pytest.raises(InputError, match=r"^path: expected a checkpoint directory or hub repo id, got None$"):
        chameleon.load(None)


def test_cache_sizes_may_be_numpy_or_torch_integers(tiny_model):
    """src_row and length taken from an array or a tensor (e.g. per-batch prefix lengths) are
    integers too: they sliced the source before copy_rows_from checked them."""
    import numpy as np

    ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    two = tiny_model.new_cache(2, 8)
    tiny_model(ids, cache=two)
    expected = tiny_model.new_cache(3, 8)
    expected.copy_rows_from(two, src_row=1, length=2)
    for src_row, length in [(np.int64(1), np.int32(2)), (torch.tensor(1), torch.tensor(2))]:
        got = tiny_model.new_cache(3, 8)
        got.copy_rows_from(two, src_row=src_row, length=length)
        assert all(torch.equal(a, b) for a, b in zip(got.tensors(), expected.tensors()))


def test_start_pos_may_be_a_numpy_integer(tiny_model):
    """The check takes numpy's integers as integers: so must the forward (an IndexError in RoPE's
    slot range before)."""
    import numpy as np

    ids = torch.tensor([[0, 5, 6]])
    logits = []
    for start_pos in (2, np.int64(2)):
        cache = tiny_model.new_cache(1, 8)
        tiny_model(ids[:, :2], cache=cache)
        logits.append(tiny_model(ids[:, 2:], cache=cache, start_pos=start_pos))
    assert torch.equal(*logits)


def test_valid_may_be_an_integer_mask(tiny_model):
    """An HF-style attention mask (int64, 1 on tokens, 0 on padding) marks the same slots as its
    bool form: written into the bool cache.valid, it did before 4569b1d's check refused it."""
    ids = torch.tensor([[1, 5, 6], [0, 7, 8]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    positions = torch.tensor([[0, 0, 1], [0, 1, 2]])
    logits = []
    for valid in (mask.bool(), mask):
        logits.append(tiny_model(ids, cache=tiny_model.new_cache(2, 8), valid=valid, positions=positions))
    assert torch.equal(*logits)


def test_api_takes_any_mapping_and_iterable_it_took_before(tiny_model):
    """The argument checks refuse what is wrong, not what worked: a read-only mapping as logit_bias,
    a generator of prompt segments."""
    from types import MappingProxyType

    opts = GenerationOptions(logit_bias=MappingProxyType({5: -1.0}))
    assert opts.logit_bias == {5: -1.0}
    assert tiny_model.encode_prompt(s for s in ["a", "b"]) == tiny_model.encode_prompt(["a", "b"])
