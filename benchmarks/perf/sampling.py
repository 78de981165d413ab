"""Time of one sampled pick (temperature, top-p) from (batch, 65,536) logits: this stack's
`pick_rows` vs what transformers' `generate` runs per step (its temperature and top-p warpers,
softmax, torch.multinomial), side by side in one run, rounds in turns.

The cost of top-p depends on how many tokens its nucleus keeps, so the logits come in several
shapes: Zipf-like (a trained model's next-token distribution is roughly a power law in the rank)
with exponents from peaked to broad, and standard normal (what a random-weight model gives: almost
flat, a nucleus of most of the vocabulary).

    python benchmarks/perf/sampling.py             # CPU: batch 1 and 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

import chameleon.sampling as sampling_module
from perf_args import positive_int, positive_ints  # beside this file
from perf_timing import in_turns


def logits_of(shape: str, batch: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    if shape == "normal":
        return torch.randn(batch, vocab, generator=g)
    exponent = float(shape.removeprefix("zipf"))
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(batch)]) + 1
    return -exponent * ranks.float().log() + 0.1 * torch.randn(batch, vocab, generator=g)


def logit_shapes(text: str) -> list[str]:
    """The --shapes type: a comma list of zipfS (S a positive number) or normal."""
    shapes = text.split(",")
    for shape in shapes:
        try:
            ok = shape == "normal" or (shape.startswith("zipf") and float(shape[4:]) > 0)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{shape!r}: expected zipfS (S a positive exponent, e.g. zipf1.2) or normal")
    return shapes


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=positive_int, default=65536)
    p.add_argument("--batches", type=positive_ints, default="1,8")
    p.add_argument("--shapes", type=logit_shapes, default="zipf1.5,zipf1.2,zipf1.0,normal", help="comma list: zipfS (exponent S) or normal")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--calls", type=positive_int, default=20, help="picks timed together in one round")
    a = p.parse_args()
    if not a.temperature > 0 or not 0 < a.top_p <= 1:  # (transformers' warpers refuse the others)
        p.error(f"arguments --temperature, --top-p: expected temperature > 0 and 0 < top-p <= 1, got {a.temperature}, {a.top_p}")
    hf_warpers = LogitsProcessorList([TemperatureLogitsWarper(a.temperature), TopPLogitsWarper(a.top_p)])
    rows = []
    for batch in a.batches:
        for shape in a.shapes:
            logits = logits_of(shape, batch, a.vocab, torch.Generator().manual_seed(0))
            kept = torch.isfinite(sampling_module.filter_top_k_top_p(logits / a.temperature, 0, a.top_p)).sum(-1)
            generators = [torch.Generator().manual_seed(i) for i in range(batch)]
            hf_generator = torch.Generator().manual_seed(0)

            def ours():
                for _ in range(a.calls):
                    sampling_module.pick_rows(logits, a.temperature, 0, a.top_p, generators)

            def transformers_():
                for _ in range(a.calls):
                    probs = hf_warpers(None, logits).softmax(-1)
                    torch.multinomial(probs, 1, generator=hf_generator)

            stacks = {"ours": ours, "transformers": transformers_}
            times = {name: (fn(), float("inf"))[1] for name, fn in stacks.items()}  # after a warm-up call each
            for name in in_turns(list(stacks), a.rounds):  # the fastest round counts
                times[name] = min(times[name], elapsed(stacks[name]) / a.calls)
            row = {"batch": batch, "shape": shape, "nucleus_median": int(kept.median()),
                   "ours_ms": round(times["ours"] * 1e3, 3), "transformers_ms": round(times["transformers"] * 1e3, 3),
                   "speedup": round(times["transformers"] / times["ours"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'batch':>5} {'logits':>8} {'nucleus':>8} {'ours ms':>9} {'transformers ms':>16} {'speed-up':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['shape']:>8} {r['nucleus_median']:>8} {r['ours_ms']:>9.3f} {r['transformers_ms']:>16.3f} {r['speedup']:>8.2f}x")


if __name__ == "__main__":
    main()
