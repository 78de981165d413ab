"""CLI subcommands of the model stack: `generate` and `convert`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from tempfile import TemporaryFile

import torch

from chameleon.chameleon import IMAGE_MARKER
from chameleon.errors import InputError, refuse_empty_paths, unicode_problem

# One set of --dtype names for every command (generate, convert, run): torch's and the short ones.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_HELP = "float32 (fp32) | bfloat16 (bf16) | float16 (fp16)"

# --model / SRC: what names a checkpoint
MODEL_HELP = ("checkpoint directory (HF or Meta format), or a Hugging Face hub repo id ORG/NAME[@REVISION] where no "
              "local path of that name exists: fetched into the hub cache, or with HF_HUB_OFFLINE=1 read from it alone")

TEXT_TOKENS = 256  # --max-new-tokens default: text, plus one image in interleaved mode

# generate's flags that set GenerationOptions fields, so that errors name what the user typed
OPTION_FLAGS = {
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty", "image_temperature": "--image-temperature",
    "image_top_p": "--image-top-p", "cfg_text_scale": "--cfg-text-scale", "cfg_image_scale": "--cfg-image-scale",
    "stop_strings": "--stop",
}
# a name standing as a word in an error: not part of a path, a file name or a quoted value ('temperature-sweep/')
_NOT_IN_A_WORD = r"\w/.'\"-"
_OPTION_FIELD = re.compile(rf"(?<![{_NOT_IN_A_WORD}])(" + "|".join(OPTION_FLAGS) + rf")(?![{_NOT_IN_A_WORD}])")
_SHARDS_ARG = re.compile(rf"(?<![{_NOT_IN_A_WORD}])shards=(\d+)(?![{_NOT_IN_A_WORD}])")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default unless it has none (None, or [] for a repeatable one), it is an
    on/off flag taking no value (store_true: off unless given), or its help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, []) or action.nargs == 0 or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype of a --dtype name (`flag`: what the user typed it as, e.g. a backend's model_args key)."""
    if name not in DTYPES:
        raise InputError(f"{flag} {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> None:
    """--device available here, checked before any weights are read; the error names the flag."""
    from chameleon.chameleon import available_device

    try:
        available_device(device)
    except InputError as err:
        raise InputError(re.sub(r"^device ", "--device ", str(err))) from None


ANNOUNCED_FROM = 1 << 30  # bytes of weights: smaller checkpoints load and save in a moment, unannounced
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".ckpt")


def weights_bytes(path: str | Path) -> int:
    """The size of the weight files directly in a checkpoint directory (0 where there is none)."""
    try:
        return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    except OSError:  # not a directory (yet): reading it will say so
        return 0


@contextmanager
def announced(what: str, path: str | Path, size: int | None = None, enabled: bool = True):
    """'what PATH (N GB) ...' on stderr before, and the seconds it took after, where the weights
    (`size`, default: those in `path`) are large enough to make the user wait (a 7B checkpoint
    takes from seconds to minutes, depending on the disk). Yields whether it announced (where a
    progress bar is worth drawing too)."""
    size = weights_bytes(path) if size is None else size
    if not enabled or size < ANNOUNCED_FROM:
        yield False
        return
    print(f"{what} {path} ({size / 1e9:.1f} GB of weights) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield True
    print(f"{what} {path}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# generate's flags that a mode does not read: set there, they get a warning (their effect is none)
UNUSED_IN_MODE = {
    "text": ("--image-temperature", "--image-top-p", "--cfg-text-scale", "--cfg-image-scale"),
    "image": ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--stop"),  # (one image)
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def warn_unused_flags(args) -> None:
    """A warning for each flag set to other than its default that --mode does not read."""
    unused = [f for f in UNUSED_IN_MODE.get(args.mode, ()) if getattr(args, _dest(f)) != args.flag_defaults[f]]
    if unused:
        print(f"warning: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect in --mode {args.mode}",
              file=sys.stderr)


def register(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text, images or both from a text (+ image) prompt",
        description=(
            "Generate from a prompt with a Chameleon checkpoint (HF or Meta format, auto-detected). "
            "Writes output.txt, PNG images, generation.json and index.html (prompt and output side by side) into --out. "
            f"Images given with --image go before the text, or where the prompt has '{IMAGE_MARKER}' markers, in order."
        ),
        formatter_class=HelpFormatter,
    )
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--image", action="append", default=[], metavar="FILE", help="prompt image (repeatable)")
    g.add_argument("--mode", choices=["text", "image", "interleaved"], default="text", help="what may be generated")
    g.add_argument("--out", required=True, help="output directory (new, or without an earlier generation in it)")
    g.add_argument("--chat", action="store_true", help=(
        "end the prompt with the end-of-turn token (<reserved08706>), the turn format of chat-tuned checkpoints "
        "(transformers' ChameleonProcessor adds it by default); without it the model continues the prompt"))
    g.add_argument("--max-new-tokens", type=int, default=None, help=(
        f"token budget; default: {TEXT_TOKENS}, and in interleaved mode {TEXT_TOKENS} plus one image (boi + the "
        "model's image codes + eoi: 1026 on the 7B), since an image starts only where all its tokens fit; the "
        "default is cut to what the context leaves after the prompt; image mode always makes exactly one image"))
    g.add_argument("--temperature", type=float, default=0.7, help="text sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=0.9, help="text nucleus sampling")
    g.add_argument("--top-k", type=int, default=0, help="text top-k sampling (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.2, help="penalty for repeated text tokens")
    g.add_argument("--image-temperature", type=float, default=0.7, help="image-code sampling temperature")
    g.add_argument("--image-top-p", type=float, default=0.9, help="image-code nucleus sampling")
    g.add_argument("--cfg-text-scale", type=float, default=3.0, help="classifier-free guidance of images: text scale")
    g.add_argument("--cfg-image-scale", type=float, default=1.2, help="classifier-free guidance of images: image scale")
    g.add_argument("--stop", action="append", default=[], metavar="STRING", help=(
        "stop string (repeatable): text ends with the token that completes one, kept in the output with "
        "whatever else that token holds"))
    g.add_argument("--seed", type=int, default=0, help="sampling seed (each prompt draws from its own stream)")
    g.add_argument("--device", default=default_device(), help="torch device, e.g. cpu, cuda, cuda:1 (cuda where available)")
    g.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   help=f"{DTYPE_HELP} (bfloat16 where CUDA is available)")
    g.set_defaults(func=cmd_generate, flag_defaults={flag: g.get_default(_dest(flag)) for flags in UNUSED_IN_MODE.values() for flag in flags})

    c = sub.add_parser(
        "convert",
        help="convert a checkpoint between Meta's and Hugging Face's formats",
        description=(
            "Convert SRC (HF or Meta format, auto-detected) to DST in the --to format: renames, the q/k and q/k-norm "
            "permutation between Meta's interleaved and HF's half-split RoPE layouts, and merging or splitting of "
            "Meta's model-parallel shards. HF output keeps the VQGAN decoder in vqgan_decoder.safetensors so that "
            "images can still be generated. DST must not exist or be empty."
        ),
        formatter_class=HelpFormatter,
    )
    c.add_argument("src", metavar="SRC", help=f"source {MODEL_HELP}")
    c.add_argument("dst", metavar="DST", help="destination directory")
    c.add_argument("--to", choices=["hf", "meta"], required=True, help="target format")
    c.add_argument("--shards", type=int, default=None, help="Meta output: number of consolidated.NN.pth files (1, or model_parallel_size; default: model_parallel_size)")
    c.add_argument("--max-shard-size", default=None, help="HF output: split safetensors above this size, e.g. 5GB or 500MiB; default: one model.safetensors")
    c.add_argument("--dtype", default=None, help=f"cast the decoder-only transformer's weights to {DTYPE_HELP}; "
                   "default: keep their dtype (the VQGAN's always keep theirs)")
    c.set_defaults(func=cmd_convert)


def run_generation(model, segments: list, opts, out: Path, extra_meta: dict | None = None, fit_context: bool = False,
                   chat: bool = False, image_files: list | None = None) -> dict:
    """Generate, then write output.txt, the images, generation.json and index.html into `out`.
    `fit_context`: a default token budget, cut to what the model's context leaves after the prompt.
    `chat`: the prompt ends its turn (see Chameleon.encode_prompt). `image_files`: the prompt's
    images' files, in order, for generation.json."""
    from chameleon.generate import generate
    from reports.generation import write_generation_page

    model.require_decoder_for(opts.mode)
    prompt_ids = model.encode_prompt(segments, end_turn=chat)
    room = model.config.max_seq_len - len(prompt_ids)
    if fit_context and 0 < room < opts.max_new_tokens:
        opts = replace(opts, max_new_tokens=room)
    start = time.perf_counter()
    new_ids = generate(model, [prompt_ids], opts)[0]
    seconds = time.perf_counter() - start
    output = model.decode_output(new_ids)
    weight = next(model.transformer.parameters())  # the numbers, so the output, depend on both
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(s for s in output if isinstance(s, str))
    (out / "output.txt").write_text(text, encoding="utf-8")  # what the page declares; not the locale's
    record = {
        "mode": opts.mode,
        "chat": chat,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(new_ids),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(len(new_ids) / seconds, 1) if seconds else None,
        "images": sum(1 for s in output if not isinstance(s, str)),
        "model_fingerprint": model.fingerprint,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "device": str(weight.device),
        **(extra_meta or {}),
    }
    settings = {k: v for k, v in asdict(opts).items() if k != "progress"}
    shown = {k: v for k, v in record.items() if k != "seed"}  # (the seed is shown among the settings)
    page = write_generation_page(out, segments, output, opts.mode, shown, page_settings(settings))
    record["page"] = str(page)
    # What reproduces the output: the prompt (images by position: their files are the caller's to
    # name), its ids and the settings, beside what was generated.
    files = iter(image_files or [])
    prompt = [s if isinstance(s, str) else {"image": str(next(files, "(given in memory)"))} for s in segments]
    (out / "generation.json").write_text(json.dumps({**record, "prompt": prompt, "options": settings,
                                                      "prompt_ids": prompt_ids, "new_ids": new_ids}, indent=2))
    return record


# The options each mode reads, which the page shows (generation.json records them all); image
# mode makes exactly one image, whatever the token budget.
_TEXT_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop_strings", "stop_ids")
_IMAGE_SETTINGS = ("image_temperature", "image_top_p", "cfg_text_scale", "cfg_image_scale")
PAGE_SETTINGS = {"text": _TEXT_SETTINGS, "image": _IMAGE_SETTINGS, "interleaved": _TEXT_SETTINGS + _IMAGE_SETTINGS}


def page_settings(options: dict) -> dict:
    """The settings the options' mode reads, then the seed and any logit bias (text phases only);
    empty stop lists are left out, and so are the nucleus, top-k and seed of greedy choices."""
    mode = options["mode"]
    unread = ({"top_p", "top_k"} if options["temperature"] == 0 else set()) | ({"image_top_p"} if options["image_temperature"] == 0 else set())
    temperatures = {"text": ("temperature",), "image": ("image_temperature",)}.get(mode, ("temperature", "image_temperature"))
    sampled = any(options[t] > 0 for t in temperatures)
    names = (*PAGE_SETTINGS[mode], *(("seed",) if sampled else ()), *(() if mode == "image" else ("logit_bias",)))
    return {name: json.dumps(list(v) if isinstance(v, tuple) else v) if isinstance(v, (tuple, dict)) else v
            for name in names if name not in unread and (v := options[name]) not in ((), {})}


def cmd_generate(args) -> int:
    import chameleon
    from chameleon.chameleon import interleave
    from chameleon.checkpoint import hub_commit, removed_on_failure, resolve_checkpoint_path
    from chameleon.vqgan import open_image

    refuse_empty_paths(("--model", args.model), ("--out", args.out), *(("--image", p) for p in args.image))
    if args.max_new_tokens is not None and args.max_new_tokens < 1:  # the API allows 0; a command that makes nothing is a mistake
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Bytes the locale cannot decode reach argv as lone surrogates, which no tokenizer can encode.
    for flag, text in [("--prompt", args.prompt), *(("--stop", s) for s in args.stop)]:
        if problem := unicode_problem(text):
            raise InputError(f"{flag}: not valid text in this locale's encoding ({problem})")
    images = []
    for path in args.image:
        try:
            images.append(open_image(path))
        except InputError as err:
            raise InputError(f"--image {err}") from None
    segments = interleave(args.prompt, images, source="--prompt")
    opts = generation_options(args)  # the flags are checked before the model loads
    warn_unused_flags(args)
    dtype = parse_dtype(args.dtype)
    check_device(args.device)  # before --out is made and the model loads
    out = Path(args.out)
    made = _fresh_output_dir(out)  # before the model loads and generates: nothing computed is lost
    # No empty or half-written --out left behind (a rerun would refuse its output.txt)
    try:
        with removed_on_failure(out, made):
            path = resolve_checkpoint_path(args.model)
            with announced("loading", path):
                model = chameleon.load(path, device=args.device, dtype=dtype)
            opts = replace(opts, max_new_tokens=token_budget(args.max_new_tokens, args.mode, model.image_seq_len))
            commit = hub_commit(args.model, path)
            source = {"model": str(args.model), **({"model_commit": commit} if commit else {})}
            try:
                record = run_generation(model, segments, opts, out, {**source, "seed": args.seed},
                                        fit_context=args.max_new_tokens is None, chat=args.chat, image_files=args.image)
            except InputError as err:  # e.g. the context's room for max_new_tokens
                raise InputError(flags_for_fields(err)) from None
    except OSError as err:
        if names_file_in(err, out):
            raise InputError(f"--out {out}: cannot write {err.filename} ({err.strerror or err})") from None
        raise
    print(json.dumps(record, indent=2))
    return 0


def generation_options(args):
    """GenerationOptions from generate's flags; an invalid value's error names its flag, not the field."""
    from chameleon.generate import GenerationOptions

    fields = {name: getattr(args, _dest(flag)) for name, flag in OPTION_FLAGS.items()}
    fields["stop_strings"] = tuple(fields["stop_strings"])
    if fields["max_new_tokens"] is None:
        fields["max_new_tokens"] = TEXT_TOKENS  # the mode's default is set once the model is known
    try:
        return GenerationOptions(**fields, seed=args.seed, mode=args.mode, progress=True)
    except InputError as err:
        raise InputError(flags_for_fields(err)) from None


def shards_flag(err: InputError) -> InputError:
    """convert's error naming the API's `shards=N` (`Chameleon.save`) as the CLI's flag, `--shards N`."""
    return InputError(_SHARDS_ARG.sub(r"--shards \1", str(err)))  # (not in a path: a sweep directory 'shards=2/')


def flags_for_fields(err: InputError) -> str:
    """An error's message with the GenerationOptions fields it names as generate's flags."""
    return _OPTION_FIELD.sub(lambda m: OPTION_FLAGS[m[1]], str(err))


def token_budget(max_new_tokens: int | None, mode: str, image_seq_len: int) -> int:
    """--max-new-tokens, or its default for the mode. An interleaved image starts only where all
    its tokens fit, so a smaller budget in that mode gets a warning (text alone is a valid output)."""
    image = image_seq_len + 2  # boi + codes + eoi
    if max_new_tokens is None:
        return TEXT_TOKENS + image if mode == "interleaved" else TEXT_TOKENS
    if mode == "interleaved" and max_new_tokens < image:
        print(f"warning: --max-new-tokens {max_new_tokens} is too small for an image: one takes {image} tokens on "
              f"this model (boi + {image_seq_len} codes + eoi), so the output will be text only (use "
              f"--max-new-tokens >= {image} to allow one)", file=sys.stderr)
    return max_new_tokens


GENERATION_FILES = ("generation.json", "output.txt", "index.html", "prompt_image_*.png", "output_image_*.png")


def _fresh_output_dir(out: Path) -> Path | None:
    """Create --out, refusing one that holds an earlier generation (it would be overwritten).
    Returns the topmost directory this made (to remove if the generation fails), else None."""
    earlier = sorted(p.name for pattern in GENERATION_FILES for p in out.glob(pattern) if p.is_file()) if out.is_dir() else []
    if earlier:
        raise InputError(f"--out {out}: already holds a generation ({', '.join(earlier)}); choose a new directory")
    return make_out_dir(out)


def make_out_dir(out: Path) -> Path | None:
    """Create --out and its parents; returns the topmost directory this made (None: --out existed)."""
    from chameleon.checkpoint import topmost_missing

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    made = topmost_missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    try:  # a directory it may not write in (read-only mount, permissions) is found now, not after the work
        with TemporaryFile(dir=out):
            pass
    except OSError as err:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise InputError(f"--out {out}: cannot write in it ({err.strerror or err})") from None
    return made


def names_file_in(err: OSError, directory: Path) -> bool:
    """Whether an OSError is about a file inside `directory`, the paths compared as written, not
    resolved: a file or folder in it may be a symlink to elsewhere (or nowhere)."""
    return bool(err.filename) and Path(os.path.abspath(directory)) in Path(os.path.abspath(err.filename)).parents


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            try:
                size = int(float(text[: -len(unit)]) * factor)
            except (ValueError, OverflowError):  # "abcMB", "nanGB", "infGB"
                break
            if size > 0:
                return size
            break
    raise InputError(f"--max-shard-size {text!r}: expected a positive size like 500MB or 5GB")


def cmd_convert(args) -> int:
    from chameleon.chameleon import save_checkpoint
    from chameleon.checkpoint import occupied, read_args, read_checkpoint, resolve_checkpoint_path
    from chameleon.convert import cast, check_meta_shards
    from chameleon.tokenizer import ChameleonTokenizer

    refuse_empty_paths(("SRC", args.src), ("DST", args.dst))
    dst = Path(args.dst)
    if why := occupied(dst):
        raise InputError(f"{dst}: destination exists and is {why}; choose a new directory")
    if args.to == "hf" and args.shards is not None:
        raise InputError("--shards applies to Meta output (--to meta); HF output is split with --max-shard-size")
    if args.to == "meta" and args.max_shard_size is not None:
        raise InputError("--max-shard-size applies to HF output (--to hf); Meta output is split with --shards")
    max_shard = _parse_size(args.max_shard_size)
    if args.shards is not None and args.shards < 1:
        raise InputError(f"--shards {args.shards}: expected a positive integer")
    dtype = None if args.dtype is None else parse_dtype(args.dtype)  # before the checkpoint is read ('' is no name)
    src = resolve_checkpoint_path(args.src)
    if args.to == "meta":  # from the config alone, before minutes of reading a large checkpoint's weights
        source_args = read_args(src)
        try:
            check_meta_shards(source_args, args.shards or source_args.model_parallel_size)
        except InputError as err:
            raise shards_flag(err) from None
    with announced("reading", src):  # (no bar: the files are mapped; the work is in the writing's)
        ckpt = read_checkpoint(src)
    if dtype:  # each tensor cast as it is written: never all of the old and the new at once
        ckpt.weights = cast(ckpt.weights, dtype)
    tokenizer = ChameleonTokenizer.from_file(ckpt.tokenizer_file)
    try:  # (a failed write leaves nothing half-written: save_checkpoint removes it)
        with announced("writing", dst, size=ckpt.nbytes) as shown:
            save_checkpoint(ckpt, dst, args.to, tokenizer, args.shards, max_shard, progress=shown)
    except InputError as err:  # e.g. q/k-norms that one file cannot keep, found once the weights are read
        raise shards_flag(err) from None
    except OSError as err:
        raise InputError(f"{dst}: writing the checkpoint failed ({err.strerror or err})") from None
    print(f"converted {args.src} ({ckpt.format}) -> {dst} ({args.to})")
    return 0
