"""End to end: `chameleon-bench generate` and `demo` write text, PNGs and an HTML page."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import chameleon
from benchmarks.cli import main
from benchmarks.runner.suite import load_suite
from chameleon.chameleon import interleave
from chameleon.generate import GenerationOptions, generate
from chameleon.vqgan import open_image
from tests.conftest import PHOTO, REPO


def image_spans_of(ids: list[int], tok, n: int) -> list[list[int]]:
    """The code ids of each image in `ids`, checking that every begin-of-image is followed by
    exactly n image codes and an end-of-image, and that no image token stands outside one."""
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == tok.boi_id:
            codes = ids[i + 1 : i + 1 + n]
            assert len(codes) == n and all(tok.is_image_token(t) for t in codes) and ids[i + 1 + n] == tok.eoi_id, i
            spans.append(codes)
            i += n + 2
        else:
            assert not tok.is_image_token(ids[i]) and ids[i] != tok.eoi_id, i
            i += 1
    return spans


@pytest.mark.parametrize("mode", ["text", "image", "interleaved"])
def test_generate_command(tiny_hf, tiny_model, tmp_path, mode):
    """The files generate writes hold what it generated: each image of the output is boi + its codes +
    eoi, and its PNG is the VQGAN's decoding of those codes; output.txt is the output's text; text
    mode generates no image token at all; image mode exactly one image and nothing else."""
    out = tmp_path / mode
    argv = ["generate", "--model", str(tiny_hf), "--prompt", "What is in this photo? <image>", "--image", str(PHOTO),
            "--mode", mode, "--max-new-tokens", "300", "--out", str(out), "--seed", "1"]
    assert main(argv) == 0
    record = json.loads((out / "generation.json").read_text())
    # generation.json holds what reproduces the output: the prompt, its ids and the settings.
    segments = interleave("What is in this photo? <image>", [open_image(PHOTO)])
    assert record["prompt"] == [s if isinstance(s, str) else {"image": str(PHOTO)} for s in segments]
    assert record["prompt_ids"] == tiny_model.encode_prompt(segments)
    settings = GenerationOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["options"].items()})
    assert (settings.mode, settings.seed, settings.max_new_tokens) == (mode, 1, 300)
    assert generate(tiny_model, [record["prompt_ids"]], settings)[0] == record["new_ids"]
    html = (out / "index.html").read_text()
    assert "prompt_image_1.png" in html and (out / "prompt_image_1.png").is_file()
    tok, n, ids = tiny_model.tokenizer, tiny_model.image_seq_len, record["new_ids"]
    assert record["mode"] == mode and record["new_tokens"] == len(ids) > 0 and record["model_fingerprint"] == tiny_model.fingerprint
    spans = image_spans_of(ids, tok, n)
    assert record["images"] == len(spans) == len(list(out.glob("output_image_*.png")))
    for k, codes in enumerate(spans, 1):
        png = np.asarray(Image.open(out / f"output_image_{k}.png"))
        assert f"output_image_{k}.png" in html
        assert np.array_equal(png, np.asarray(tiny_model.vqgan.decode_image(tok.ids_to_codes(codes))))
    text = "\n".join(s for s in tiny_model.decode_output(ids) if isinstance(s, str))
    assert (out / "output.txt").read_text(encoding="utf-8") == text
    if mode == "image":
        assert len(spans) == 1 and len(ids) == n + 2 and Image.open(out / "output_image_1.png").size == (128, 128)
    else:  # no image here: text mode may not open one, and interleaved mode happens not to (the demo test has one)
        assert not spans and tok.boi_id not in ids and text.strip()


def test_console_script_help_and_demo(tmp_path):
    """`make demo`'s whole job, as a process: the tiny model, the interleaved generation page and
    the smoke suite on the shipped data (about a minute here)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "generate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--cfg-text-scale" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "smoke-run" / "results.json").read_text())
    suite = load_suite("smoke")
    assert results["complete"] and list(results["benchmarks"]) == [b.name for b in suite.benchmarks]
    for name, entry in results["benchmarks"].items():  # every item ran and was scored; the table shows each
        assert entry["n_items"] > 0 and entry["n_failed"] == 0 and entry["metrics"], (name, entry)
        assert re.search(rf"^{name}\b", proc.stdout, re.M), proc.stdout
    assert results["benchmarks"]["mmlu"]["n_items"] == 57 and results["benchmarks"]["coco"]["n_scored"] == 4
    page = (tmp_path / "demo" / "generation" / "index.html").read_text()
    assert "output_image_1.png" in page
    model = chameleon.load(tmp_path / "demo" / "tiny-chameleon")
    record = json.loads((tmp_path / "demo" / "generation" / "generation.json").read_text())
    ids = record["new_ids"]
    # Its recorded settings (a logit bias keyed by a token id, a string in JSON) regenerate it.
    assert record["options"]["logit_bias"] == {str(model.tokenizer.boi_id): 4.0}
    assert generate(model, [record["prompt_ids"]], GenerationOptions(**record["options"]))[0] == ids
    assert len(image_spans_of(ids, model.tokenizer, model.image_seq_len)) >= 1
    kinds = [type(s).__name__ for s in model.decode_output(ids)]
    assert kinds[0] == "str" and "Image" in kinds and kinds[-1] == "str"  # text, an image, then text


def test_max_new_tokens_default_leaves_room_for_an_image_in_interleaved_mode(tiny_hf, tmp_path, monkeypatch, capsys):
    """An interleaved image starts only where all its tokens fit: the default budget holds one
    (boi + 256 codes + eoi on the tiny model) plus 256 text tokens; a smaller explicit budget is
    kept, with a warning naming the flag."""
    budgets = []
    monkeypatch.setattr(importlib.import_module("chameleon.generate"), "generate",
                        lambda model, prompts, opts: budgets.append(opts.max_new_tokens) or [[]])
    base = ["generate", "--model", str(tiny_hf), "--prompt", "hi"]
    assert main([*base, "--mode", "interleaved", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert budgets == [256 + 258, 256] and "warning" not in capsys.readouterr().err
    assert main([*base, "--mode", "interleaved", "--max-new-tokens", "257", "--out", str(tmp_path / "c")]) == 0
    assert budgets[-1] == 257
    assert "warning: --max-new-tokens 257 is too small for an image: one takes 258 tokens" in capsys.readouterr().err
    assert main([*base, "--mode", "interleaved", "--max-new-tokens", "258", "--out", str(tmp_path / "d")]) == 0
    assert "warning" not in capsys.readouterr().err
    # The default is cut to what the context (2,048 here) leaves after a long prompt.
    long = "Natalia sold clips to 48 of her friends. " * 150
    room = 2048 - len(chameleon.load(tiny_hf).encode_prompt(long))
    assert 0 < room < 256 + 258
    assert main(["generate", "--model", str(tiny_hf), "--prompt", long, "--mode", "interleaved", "--out", str(tmp_path / "e")]) == 0
    assert budgets[-1] == room


def test_generation_page_numbers_images_among_images(tmp_path):
    from reports.generation import write_generation_page

    image = Image.new("RGB", (8, 8))
    page = write_generation_page(tmp_path, ["What is in this photo?", image], ["A cat.", image, "Another:", image], "interleaved", {})
    html = page.read_text()
    assert 'alt="prompt image 1"' in html and 'alt="prompt image 2"' not in html
    assert 'alt="generated image 1"' in html and 'alt="generated image 2"' in html and "image 3" not in html


def test_outputs_are_utf8_whatever_the_locale(tiny_hf, tmp_path):
    """output.txt and index.html (which declares utf-8) are written as UTF-8 in an ASCII locale too
    (as on Windows' cp1252 for most text): the write failed there once the generation was done."""
    script = f"""
import importlib, sys
from pathlib import Path
import chameleon
from chameleon.commands import run_generation
from chameleon.generate import GenerationOptions
model = chameleon.load({str(tiny_hf)!r})
ids = model.tokenizer.encode_text("caf\\u00e9 \\u2615 \\ufffd")
importlib.import_module("chameleon.generate").generate = lambda model, prompts, opts: [ids]
run_generation(model, ["caf\\u00e9?"], GenerationOptions(max_new_tokens=len(ids)), Path({str(tmp_path / "out")!r}))
"""
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "output.txt").read_bytes().decode("utf-8") == "caf\u00e9 \u2615 \ufffd"
    html = (tmp_path / "out" / "index.html").read_bytes().decode("utf-8")
    assert "caf\u00e9?" in html and "caf\u00e9 \u2615 \ufffd" in html


def test_help_states_each_default_once(capsys):
    for command in ("generate", "convert", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: [])" not in text, command
        assert "(default: False)" not in text, command  # an on/off flag (generate --chat) is off unless given
        assert "float32 (fp32) | bfloat16 (bf16) | float16 (fp16)" in text, command
    assert "--device DEVICE torch device, e.g. cpu, cuda, cuda:1 (under torchrun, cuda is each process's own GPU); default: cpu" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--out OUT output directory (default: demo_out)" in " ".join(capsys.readouterr().out.split())


def test_help_says_what_defaults_cover(capsys):
    """Help true to the code: shipped photos are COCO's alone, convert --dtype leaves the VQGAN's
    weights as they are (tests/test_convert.py checks the files), --device follows CUDA as --dtype does."""
    from benchmarks.runner.captioning import DEFAULT_IMAGES

    assert DEFAULT_IMAGES["coco"].is_dir() and not DEFAULT_IMAGES["flickr30k"].exists()
    helps = {}
    for command in ("run", "convert", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "default: the shipped photos, COCO only (flickr30k needs one)" in helps["run"]
    # the responses backend has no batch size: run_suite chunks it by 32
    assert "--chunk-size CHUNK_SIZE requests per saved chunk (resume granularity); default 4 x batch size (responses: 32)" in helps["run"]
    assert "cast the decoder-only transformer's weights to" in helps["convert"] and "(the VQGAN's always keep theirs)" in helps["convert"]
    assert "cuda:1 (cuda where available)" in helps["generate"]


def test_misspelt_flag_names_its_command_and_the_flag_meant(capsys, tmp_path):
    """An unknown flag after a command is that command's error (its usage, not the top level's),
    with the closest of its flags."""
    for argv, usage, meant in (
        (["generate", "--model", "m", "--prompt", "p", "--out", str(tmp_path), "--temprature", "0"],
         "usage: chameleon-bench generate", "did you mean --temperature?"),
        (["run", "smoke", "--model", "m", "--out", str(tmp_path), "--images_dir", "coco=x"],
         "usage: chameleon-bench run", "did you mean --images-dir?"),
        (["convert", "a", "b", "--to", "hf", "--xyz"], "usage: chameleon-bench convert", None),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(usage), err
        assert f"unrecognized arguments: {' '.join(argv[-2 if meant else -1:])}" in err, err
        assert (meant in err) if meant else "did you mean" not in err, err


def test_chat_ends_the_prompt_turn(tiny_hf, tmp_path):
    """--chat closes the prompt with end-of-turn, as chat-tuned checkpoints expect; the output is
    what the API gives for that prompt."""
    from chameleon.generate import GenerationOptions, generate

    model = chameleon.load(tiny_hf)
    ids = model.encode_prompt("Say hi.", end_turn=True)
    assert ids == model.encode_prompt("Say hi.") + [model.tokenizer.eot_id]
    base = ["generate", "--model", str(tiny_hf), "--prompt", "Say hi.", "--temperature", "0", "--max-new-tokens", "8"]
    assert main([*base, "--chat", "--out", str(tmp_path / "chat")]) == 0
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    chat, plain = (json.loads((tmp_path / d / "generation.json").read_text()) for d in ("chat", "plain"))
    assert chat["chat"] and not plain["chat"]
    assert chat["prompt_tokens"] == len(ids) == plain["prompt_tokens"] + 1
    opts = GenerationOptions(max_new_tokens=8, temperature=0.0, repetition_penalty=1.2)
    assert chat["new_ids"] == generate(model, [ids], opts)[0]


def test_flags_the_mode_does_not_read_get_a_warning(tmp_path, capsys):
    """Image sampling and guidance flags in text mode, text sampling flags and --stop in image mode:
    set, they change nothing, and the user is told so (before the model loads; here none exists)."""
    base = ["generate", "--model", str(tmp_path / "none"), "--prompt", "hi", "--out", str(tmp_path / "out")]
    for flags, warning in [
        (["--cfg-text-scale", "5"], "warning: --cfg-text-scale has no effect in --mode text"),
        (["--mode", "text", "--image-top-p", "0.5", "--cfg-image-scale", "1"], "warning: --image-top-p, --cfg-image-scale have no effect in --mode text"),
        (["--mode", "image", "--temperature", "0", "--stop", "x"], "warning: --temperature, --stop have no effect in --mode image"),
        (["--mode", "image", "--max-new-tokens", "100"], "warning: --max-new-tokens has no effect in --mode image"),  # one image, whatever the budget
        (["--mode", "image", "--temperature", "0.7", "--cfg-text-scale", "5"], None),  # the default's value; a flag image mode reads
        (["--mode", "interleaved", "--temperature", "0", "--cfg-text-scale", "5", "--stop", "x"], None),
    ]:
        assert main([*base, *flags]) == 2  # (the missing checkpoint)
        err = capsys.readouterr().err
        assert (warning in err) if warning else "warning" not in err, (flags, err)


def test_generation_json_records_dtype_and_device(tiny_hf, tmp_path):
    """The dtype and device change the numbers, so the output too: generation.json records them
    beside the model, the seed and the options, or a rerun cannot know how it was made."""
    for dtype, recorded in (("bf16", "bfloat16"), ("float32", "float32")):
        out = tmp_path / dtype
        argv = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                "--dtype", dtype, "--out", str(out)]
        assert main(argv) == 0
        record = json.loads((out / "generation.json").read_text())
        assert (record["dtype"], record["device"]) == (recorded, "cpu")


def test_page_shows_the_part_of_a_prompt_image_the_model_reads(tiny_hf, tmp_path):
    """The model reads a prompt image's centre square (shortest side scaled, the rest cropped): the
    page shows that square, not a panorama's whole width, most of which the model never saw."""
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100], wide[:, 100:200], wide[:, 200:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--image", str(tmp_path / "wide.png"),
            "--max-new-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    shown = np.asarray(Image.open(out / "prompt_image_1.png"))
    assert shown.shape == (100, 100, 3) and (shown == (0, 255, 0)).all()


def _table(html: str, css_class: str) -> dict[str, str]:
    """The rows of the page's <table class=css_class>, key -> value text."""
    table = re.search(rf'<table class="{css_class}">(.*?)</table>', html, re.S)
    assert table, css_class
    return dict(re.findall(r"<tr><td>(.*?)</td><td><code>(.*?)</code></td></tr>", table[1]))


def test_page_shows_the_settings_the_mode_reads(tiny_hf, tmp_path):
    """The page is what people look at and share: it shows the sampling settings that made the
    output, those the mode reads (text mode has no guidance, image mode no text sampling)."""
    base = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--max-new-tokens", "3", "--seed", "4"]
    assert main([*base, "--temperature", "0.5", "--top-k", "7", "--stop", "x<y", "--out", str(tmp_path / "text")]) == 0
    shown = _table((tmp_path / "text" / "index.html").read_text(), "settings")
    assert shown["temperature"] == "0.5" and shown["top_k"] == "7" and shown["top_p"] == "0.9" and shown["seed"] == "4"
    assert shown["stop_strings"] == "[&#34;x&lt;y&#34;]" and shown["max_new_tokens"] == "3"
    assert not {"cfg_text_scale", "image_temperature", "kernels", "progress"} & set(shown)
    assert main([*base, "--mode", "image", "--cfg-text-scale", "5", "--out", str(tmp_path / "image")]) == 0
    shown = _table((tmp_path / "image" / "index.html").read_text(), "settings")
    assert shown["cfg_text_scale"] == "5.0" and shown["image_top_p"] == "0.9" and shown["seed"] == "4"
    assert not {"temperature", "top_k", "stop_strings", "max_new_tokens"} & set(shown)  # (image mode makes one image)
    # Greedy: no nucleus, top-k or seed, which change nothing there
    assert main([*base, "--temperature", "0", "--top-k", "7", "--out", str(tmp_path / "greedy")]) == 0
    shown = _table((tmp_path / "greedy" / "index.html").read_text(), "settings")
    assert shown["temperature"] == "0.0" and not {"top_p", "top_k", "seed"} & set(shown), shown


def test_image_errors_name_the_flag(tiny_hf, tmp_path, capsys):
    """A prompt image that cannot be read is named with its flag, before the model loads."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for path, problem in ((tmp_path / "missing.png", "image file not found"), (tmp_path / "bad.png", "not a readable image")):
        argv = ["generate", "--model", str(tiny_hf), "--prompt", "hi", "--image", str(path), "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        assert f"error: --image {path}: {problem}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupt_while_commands_import_is_not_a_traceback(tmp_path, monkeypatch, capsys):
    """^C in the seconds the command modules take to import (torch, transformers) ends as any
    other interrupt does: exit 130, "interrupted", no traceback."""
    import benchmarks.cli

    (tmp_path / "slow_import.py").write_text("raise KeyboardInterrupt\n")  # where ^C lands: inside an import
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(benchmarks.cli, "COMMAND_MODULES", [*benchmarks.cli.COMMAND_MODULES, "slow_import"])
    assert main(["generate", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_interrupt_while_the_cli_starts_is_not_a_traceback():
    """^C in the first second of any command, while the console script imports the model stack
    (torch), also ends as an interrupt: exit 130, "interrupted", no traceback. A finder raising
    KeyboardInterrupt on importing `chameleon` stands in for the keypress, deterministically."""
    start = ("import sys\n"
             "class Interrupt:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'chameleon': raise KeyboardInterrupt\n"
             "sys.meta_path.insert(0, Interrupt())\n"
             "from benchmarks.cli import main\n"
             "sys.exit(main(['generate', '--help']))\n")
    done = subprocess.run([sys.executable, "-c", start], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "interrupted\n"), done.stderr[-2000:]


def _cli(argv, **streams):
    # stdout buffered, as in a user's shell (not PYTHONUNBUFFERED, which a test runner may set)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-m", "benchmarks.cli", *map(str, argv)], cwd=REPO, timeout=300, env=env,
                          **streams)


def test_closed_output_ends_quietly(tiny_hf, tmp_path):
    """Whoever reads stdout or stderr going away (`| head`) stops a command as SIGPIPE stops a C
    program: exit 141, no traceback, no 'Exception ignored' at exit (a traceback and exit 1
    before). A stdout or stderr closed from the start (`2>&-`) is as if sent to /dev/null:
    before, an error exited 1 (writing it to None failed) and generate's progress bar failed it."""
    read, write = os.pipe()
    os.close(read)  # a reader that is gone: writing raises BrokenPipeError (Python ignores SIGPIPE)
    argv = ["convert", tiny_hf, tmp_path / "meta", "--to", "meta"]
    done = _cli(argv, stdout=write, stderr=subprocess.PIPE, text=True)
    assert (done.returncode, done.stderr) == (141, "")
    assert sorted(p.name for p in (tmp_path / "meta").iterdir())[:3] == ["consolidate_params.json", "consolidated.00.pth",
                                                                         "consolidated.01.pth"]  # the work was done
    done = _cli(["generate", "--help"], stdout=write, stderr=subprocess.PIPE, text=True)  # argparse's exit
    assert (done.returncode, done.stderr) == (141, "")
    generate = ["generate", "--model", tiny_hf, "--prompt", "hi", "--max-new-tokens", "2", "--out"]
    done = _cli([*generate, tmp_path / "g1"], stdout=subprocess.PIPE, stderr=write, text=True)  # its progress bar
    assert (done.returncode, done.stdout) == (141, "") and not (tmp_path / "g1").exists()
    os.close(write)

    closed = {"stdout": subprocess.PIPE, "preexec_fn": lambda: os.close(2), "text": True}
    assert _cli(["convert", "", tmp_path / "x", "--to", "hf"], **closed).returncode == 2
    done = _cli([*generate, tmp_path / "g2"], **closed)
    assert done.returncode == 0 and json.loads(done.stdout)["new_tokens"] == 2
    assert (tmp_path / "g2" / "output.txt").is_file()


def test_a_broken_pipe_elsewhere_is_not_hidden():
    """Only stdout's or stderr's reader going away ends quietly: a BrokenPipeError from another
    pipe (a subprocess's, a socket) is a failure with its traceback."""
    start = ("import os, sys; from benchmarks import cli\n"
             "def fail(args):\n    r, w = os.pipe(); os.close(r); os.write(w, b'x')\n"
             "cli._main = lambda argv: fail(argv)\n"
             "sys.exit(cli.main([]))\n")
    done = subprocess.run([sys.executable, "-c", start], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "BrokenPipeError" in done.stderr, done.stderr[-2000:]


def test_a_broken_pipe_with_captured_output_is_not_replaced(monkeypatch, capsys):
    """main called where stdout and stderr have no descriptor (captured, as here): a BrokenPipeError
    from another pipe stays itself, not io.UnsupportedOperation from asking for their descriptors."""
    from benchmarks import cli

    def fail(argv):
        read, write = os.pipe()
        os.close(read)
        try:
            os.write(write, b"x")
        finally:
            os.close(write)

    monkeypatch.setattr(cli, "_main", fail)
    with pytest.raises(BrokenPipeError):
        cli.main([])
