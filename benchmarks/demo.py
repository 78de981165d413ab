"""`chameleon-bench demo`: what `make demo` runs, offline, on the project's own tiny model.

1. builds the tiny random Chameleon (if missing);
2. an interleaved generation from a real photo -> an HTML page with its text and image;
3. the `smoke` suite (GSM8K, MATH, MMLU and COCO captioning on small real subsets) -> results table.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

PHOTO = Path(__file__).resolve().parent / "data" / "images" / "skimage" / "chelsea.png"


def register(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="build the tiny model, generate, and run the smoke suite (what `make demo` runs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--skip-suite", action="store_true", help="only the generation page")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import chameleon
    from chameleon.commands import make_out_dir, run_generation
    from chameleon.errors import refuse_empty_paths
    from chameleon.generate import GenerationOptions
    from chameleon.tiny import build_tiny_model
    from chameleon.vqgan import open_image

    refuse_empty_paths(("--out", args.out))
    out = Path(args.out)
    make_out_dir(out)
    model_dir = out / "tiny-chameleon"
    if not (model_dir / "config.json").is_file():
        print(f"building the tiny random Chameleon in {model_dir}")
        # built aside and renamed: an interrupted build leaves no half-written model that a rerun would load
        partial = out / "tiny-chameleon.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny_model(partial, "hf", seed=0)
        shutil.rmtree(model_dir, ignore_errors=True)
        partial.rename(model_dir)
    model = chameleon.load(model_dir)
    segments = [open_image(PHOTO), "Describe this cat, then draw another one."]
    # A random model rarely opens an image by itself: a logit bias on begin-of-image makes the
    # page show text, an image, and text again.
    opts = GenerationOptions(
        mode="interleaved", max_new_tokens=model.image_seq_len + 96, temperature=0.8, seed=0, progress=True,
        logit_bias={model.tokenizer.boi_id: 4.0},
    )
    with torch.inference_mode():
        record = run_generation(model, segments, opts, out / "generation", {"model": "tiny random Chameleon (demo)"},
                                image_files=[PHOTO])
    print(f"interleaved generation: {record['new_tokens']} tokens, {record['images']} image(s), {record['tokens_per_second']} tok/s")
    print(f"page: {record['page']}")
    if args.skip_suite:
        return 0
    from benchmarks.cli import build_parser  # `run`'s own defaults, as if typed on the command line

    print("\nsmoke suite on the tiny model (random weights: expect scores near zero)")
    suite_args = build_parser().parse_args(["run", "smoke", "--model", str(model_dir), "--out", str(out / "smoke-run")])
    return suite_args.func(suite_args)
