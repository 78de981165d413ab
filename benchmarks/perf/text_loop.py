"""Decoding on loops that stay on the device vs the general per-row loop that such requests ran
before: greedy text with stop strings (how lm-eval's generate_until tasks decode), sampled text
(temperature 0.9, top-p 0.9), and interleaved generation of an image (3-way guidance), whose codes
now run in a lockstep block. Same model, same prompts, one run, rounds in turns; on CPU the tokens
must be equal.

    python benchmarks/perf/text_loop.py            # CPU: ~100M params, bf16, batch 1 and 8
"""

from __future__ import annotations

import argparse
import importlib
import dataclasses
import json

import torch

from decode import build_pair, random_prompts, timed  # benchmarks/perf/decode.py, beside this file
from perf_args import device as device_arg, names_of, positive_int, positive_ints
from perf_timing import in_turns
from chameleon.config import PRESETS, preset
from chameleon.generate import GenerationOptions, generate
from chameleon.tiny import TINY_VQ

generate_module = importlib.import_module("chameleon.generate")  # (chameleon.generate is also the function)


def tokens_per_row(outputs: dict[str, list[list[int]]]) -> int:
    """The number of new tokens of every row, in every loop. The workloads are built so that all
    rows decode the same number (eos kept out, a stop string that never occurs): seconds for the
    batch mean tokens per row only then, and the loops compare the same work only then."""
    counts = {name: [len(row) for row in rows] for name, rows in outputs.items()}
    if len({n for rows in counts.values() for n in rows}) != 1:
        raise SystemExit(f"rows decoded different numbers of new tokens: {counts}")
    return next(iter(counts.values()))[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="100M", choices=list(PRESETS))
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batches", type=positive_ints, default="1,8")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="text workloads (the image workload: its image and 2 tokens)")
    p.add_argument("--repeats", type=positive_int, default=4)
    names = ("greedy_stop_strings", "sampled", "interleaved_image")
    p.add_argument("--workloads", type=names_of(*names), default=",".join(names), help="comma list of what to time")
    a = p.parse_args()
    device = a.device
    args = dataclasses.replace(preset(a.preset), max_seq_len=1024, model_parallel_size=1)
    args.vocab_size = max(args.vocab_size, 65536)
    vq = dataclasses.replace(TINY_VQ, n_embed=8192)
    n = vq.image_seq_len
    if a.new_tokens >= n + 2:  # the general loop's interleaved mode could then start an image
        p.error(f"argument --new-tokens: at most {n + 1} (an image is boi + {n} codes + eoi), got {a.new_tokens}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model, _ = build_pair(args, vq, device, dtype, with_hf=False)
    tok = model.tokenizer
    # eos kept out, so every row decodes all its tokens; the stop string never occurs.
    base = dict(max_new_tokens=a.new_tokens, logit_bias={tok.eos_id: -1e9, tok.eot_id: -1e9}, seed=0)
    per_row = 10**9  # LOCKSTEP_MIN_CODES that keeps every code in the per-row loop
    workloads = {  # name: {loop: (options, LOCKSTEP_MIN_CODES)}
        name: {"device_loop": (GenerationOptions(**base, **extra), generate_module.LOCKSTEP_MIN_CODES),
               # Interleaved mode with too few tokens for an image is text mode through the general loop.
               "general_loop": (GenerationOptions(**base, **extra, mode="interleaved"), per_row)}
        for name, extra in (("greedy_stop_strings", dict(stop_strings=("\x00never",))), ("sampled", dict(temperature=0.9, top_p=0.9)))
    }
    # An image at once, then 2 text tokens (eos kept out here too)
    image = GenerationOptions(mode="interleaved", max_new_tokens=n + 4, seed=0, logit_bias={**base["logit_bias"], tok.boi_id: 1e9})
    workloads["interleaved_image"] = {"device_loop": (image, generate_module.LOCKSTEP_MIN_CODES), "general_loop": (image, per_row)}

    def run(prompts, loop):
        opts, generate_module.LOCKSTEP_MIN_CODES = loop
        return generate(model, prompts, opts)

    for workload in a.workloads:
        loops = workloads[workload]
        for batch in a.batches:
            prompts = random_prompts(tok, batch, 128, seed=0).tolist()
            outputs = {name: run(prompts, loop) for name, loop in loops.items()}  # warm-up
            if device.type == "cpu":  # a GPU's device loops sample from GPU generators: other draws
                assert outputs["device_loop"] == outputs["general_loop"], workload
            new_tokens = tokens_per_row(outputs)  # (checked before the timed runs)
            best = {name: float("inf") for name in loops}
            for name in in_turns(list(loops), a.repeats):
                best[name] = min(best[name], timed(lambda: run(prompts, loops[name]), device)[0])
            print(json.dumps({"workload": workload, "batch": batch, "dtype": a.dtype, "new_tokens": new_tokens, "seconds": best,
                              "speedup": best["general_loop"] / best["device_loop"]}), flush=True)


if __name__ == "__main__":
    main()
