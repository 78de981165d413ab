"""Prefill and decode speed: this stack vs transformers' generate, same random weights, one run.

    python benchmarks/perf/decode.py                       # CPU: ~100M params, full 65,536 vocabulary, fp32 and bf16
    python benchmarks/perf/decode.py --preset 7B --device cuda --dtypes bf16 --image   # GPU

Competitors: transformers `generate` with its default dynamic cache, and with a static cache
(compiled on CUDA), in the same dtype. Both sides sample text from the same candidates: a
tokenizer that knows all 65,536 ids, with the 8,192 image codes at ids 4..8195 as in the real one.
On CUDA the script also measures copy bandwidth and reports decode speed as a fraction of the
memory-bandwidth roofline (weight bytes / bandwidth), and times one image
(`--image`: N codes with 3-way classifier-free guidance, then VQGAN decoding at 512x512).
Targets (see issue): CPU decode >= 2x transformers' default at batch 1; GPU decode >= 75% of roofline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from chameleon.config import PRESETS, ModelArgs, VQGANConfig, preset
from chameleon.errors import InputError
from chameleon.convert import HF_VQ_PREFIX, to_hf
from chameleon.generate import GenerationOptions, generate, non_text_mask
from chameleon.tiny import TINY_VQ, random_model
from perf_args import device as device_arg, json_path, names_of, positive_int, positive_ints  # beside this file
from perf_timing import in_turns


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def build_pair(args, vq: VQGANConfig, device, dtype, with_hf=True, fuse=True):
    # A tokenizer that knows all 65,536 ids (8,192 image codes at 4..8195, as in the real one), so
    # that text mode's candidates, and the output rows it computes, are those of a real checkpoint.
    ours = random_model(args, vq, seed=0, device=device, fill_vocab=True)
    tokenizer = ours.tokenizer
    ours.transformer.to(dtype)
    if device.type == "cpu":  # as chameleon.load does
        ours.transformer.optimize_for_cpu_()
    elif fuse:
        ours.transformer.fuse_()
    ours.eval()
    hf = None
    if with_hf:
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
        cfg = args.to_hf(vq, tokenizer.vocab, special)
        cfg.pop("chameleon_bench")
        with torch.device(device):
            hf = ChameleonForConditionalGeneration(ChameleonConfig(**cfg)).to(dtype).eval()
        state = {**to_hf(ours.transformer.state_dict(), args),  # (a LazyTensors: permuted as read)
                 **{HF_VQ_PREFIX + k: v for k, v in ours.vqgan.state_dict().items() if not k.startswith("decoder.")}}
        missing, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ours, hf


def greedy(tok, new_tokens: int, compile_: bool, graph_steps: int | None = None, kernels: str = "torch") -> GenerationOptions:
    """Greedy text with eos kept out, so that every run decodes exactly `new_tokens` tokens."""
    return GenerationOptions(max_new_tokens=new_tokens, temperature=0.0, logit_bias={tok.eos_id: -1e9, tok.eot_id: -1e9}, compile=compile_,
                             graph_steps=graph_steps, kernels=kernels)


def random_prompts(tok, batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded random text after bos: text token ids from 100 up. No image codes or control tokens
    (nor the first ids, the specials): they would make another prompt than plain text; a
    begin-of-image followed by text, for one, is refused by generate."""
    text = (~non_text_mask(tok, tok.vocab_size, "cpu")).nonzero().flatten()
    text = text[text >= 100]
    picks = torch.randint(len(text), (batch, length), generator=torch.Generator().manual_seed(seed))
    ids = text[picks]
    ids[:, 0] = tok.bos_id
    return ids


class Competitor:
    """One stack's greedy generate over fixed prompts: `run(n)` returns the new tokens of each row."""

    def __init__(self, name, run):
        self.name, self.run = name, run


def ours_competitor(model, prompts, compile_, graph_steps=None, kernels="torch") -> Competitor:
    tok = model.tokenizer
    name = "ours" if kernels == "torch" else f"ours_{kernels}"

    def run(n):
        with warnings.catch_warnings():
            # Refused (weights not fused, no GPU...), the fused path warns and runs the usual
            # step, which would be timed under its name: an error here instead.
            warnings.filterwarnings("error", message="kernels='triton' does not apply")
            return generate(model, prompts, greedy(tok, n, compile_, graph_steps, kernels))

    return Competitor(name, run)


def hf_competitor(hf, prompts, device, cache_impl, tok) -> Competitor:
    """transformers' generate, greedy, over the same candidates as our text mode (eos kept out)."""
    ids = torch.tensor(prompts, device=device)
    from transformers.generation import LogitsProcessorList

    banned = torch.ones(hf.config.vocab_size, dtype=torch.bool)
    banned[: tok.vocab_size] = tok.non_text_ids
    banned[[tok.eos_id, tok.eot_id]] = True
    banned = banned.to(device)
    # One precomputed mask, as our text mode applies: cheaper for HF than `suppress_tokens`.
    kw = dict(do_sample=False, pad_token_id=tok.pad_id, eos_token_id=None,
              logits_processor=LogitsProcessorList([lambda input_ids, scores: scores.masked_fill(banned, float("-inf"))]))
    if cache_impl == "static":  # on CUDA, transformers compiles the forward for a static cache
        kw["cache_implementation"] = "static"

    def run(n):
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return out[:, ids.shape[1]:].tolist()

    return Competitor(f"hf_{'default' if cache_impl == 'dynamic' else cache_impl}", run)


def time_side_by_side(competitors, batch, prompt_len, new_tokens, device, repeats):
    """Prefill and decode speed of each competitor, timed in turns; yields (speeds, outputs) so far
    after each timed run, so that a run cut short keeps what it measured.

    A shared machine's speed drifts by 20-30% within minutes, so timing one stack's runs and then
    the other's can compare a fast phase with a slow one. Here every round times each competitor
    once (1 new token, then `new_tokens`), the order reversed every other round. Each keeps its
    fastest runs: prefill time = fastest 1-token run, decode time = fastest N-token run - that.
    """
    best, outputs = {}, {}
    for c in in_turns(competitors, repeats):
        if c.name not in best:
            # Warm-up (compile, capture every graph a timed run replays), just before its first timed
            # run. Twice: with graphs of N steps (graph_steps, --triton) the first run's first N-step
            # call is spent on uncaptured warm-up steps, so below 2N + 1 new tokens (the profile
            # stage's 32, N = 16) it captured no N-step graph, and the timed run did.
            c.run(new_tokens)
            c.run(new_tokens)
            best[c.name] = {"prefill_s": float("inf"), "total_s": float("inf")}
        t1, _ = timed(lambda: c.run(1), device)
        tn, outputs[c.name] = timed(lambda: c.run(new_tokens), device)
        assert all(len(o) == new_tokens for o in outputs[c.name])
        best[c.name]["prefill_s"] = min(best[c.name]["prefill_s"], t1)
        best[c.name]["total_s"] = min(best[c.name]["total_s"], tn)
        yield {name: {"prefill_tok_s": batch * prompt_len / b["prefill_s"], "decode_tok_s": _rate(batch * (new_tokens - 1), b["total_s"] - b["prefill_s"])}
               for name, b in best.items()}, outputs


def _rate(tokens: int, seconds: float) -> float | None:
    """tokens / seconds, or None where timing noise left no time (a short run on a loaded machine)."""
    return tokens / seconds if seconds > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def compare(speeds: dict, outputs: dict, weight_bytes: int, bw: float | None, batch: int) -> dict:
    """A row's figures from each competitor's speeds and tokens: ours against the roofline (a decode
    step can take no less than reading every weight once) and against each other competitor.
    Unmeasured decode speeds (None) give None."""
    row = {"ours": speeds["ours"]}
    for name in ("ours", "ours_triton"):
        if bw is not None and name in speeds:
            row[f"fraction_of_roofline{name[4:]}"] = _ratio(speeds[name]["decode_tok_s"], bw / weight_bytes * batch)
    for name, speed in speeds.items():
        if name == "ours":
            continue
        row[name] = speed
        row[f"decode_ratio_vs_{name}"] = _ratio(row["ours"]["decode_tok_s"], speed["decode_tok_s"])
        # Greedy tokens agree exactly in fp32; in bf16 the two stacks round differently, so
        # report how many leading tokens agree (random weights make near-ties common).
        row[f"same_tokens_as_{name}"] = outputs[name] == outputs["ours"]
        row[f"leading_tokens_agreeing_{name}"] = [next((i for i, (x, y) in enumerate(zip(o, h)) if x != y), len(o))
                                                  for o, h in zip(outputs["ours"], outputs[name])]
    return row


def profile_ours(model, prompts, new_tokens, device, compile_, graph_steps=None, kernels="torch") -> None:
    """Print the kernels that take the device's time in a greedy decode (where the roofline is lost)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generate(model, prompts, greedy(model.tokenizer, new_tokens, compile_, graph_steps, kernels))
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90), flush=True)


def text_logits(ours, hf, prompt_len, device):
    """Both stacks' float32 logits over the text ids after one fixed prompt."""
    tok = ours.tokenizer
    ids = random_prompts(tok, 1, prompt_len, seed=1).to(device)
    keep = ~tok.non_text_ids.to(device)
    with torch.no_grad():
        mine = ours(ids)[0, -1].float()[keep]
        theirs = hf(ids).logits[0, -1].float()[keep] if hf is not None else None
    return mine, theirs


def copy_bandwidth(device) -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = timed(lambda: y.copy_(x), device, 10)
    return 2 * x.numel() * x.element_size() / t  # bytes read + written per second


# SDPA backends that take the additive mask the KV cache needs (flash attention takes none)
SDPA_BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_enabled() -> list[str]:
    """The SDPA backends torch may choose from now (what --sdpa-backend left enabled)."""
    flags = {"flash": torch.backends.cuda.flash_sdp_enabled, "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
             "math": torch.backends.cuda.math_sdp_enabled, "cudnn": torch.backends.cuda.cudnn_sdp_enabled}
    return [name for name, enabled in flags.items() if enabled()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="100M", choices=list(PRESETS), help="model shape: 100M (default, on every device), 7B, 30B (34B: the same), tiny")
    p.add_argument("--shape", default=None, help="override the preset's shape, e.g. dim=384,n_layers=26,n_heads=6 (params.json names)")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", type=names_of("fp32", "bf16"), default=None, help="comma list of fp32, bf16 (default: bf16 on CUDA;"
                   " fp32,bf16 on CPU). bf16 is the released checkpoints' dtype, which transformers loads them in by default")
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--new-tokens", type=positive_int, default=64, help="at least 2: decode time is that of N tokens less that of 1")
    p.add_argument("--batches", type=positive_ints, default="1,4")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed runs per figure, the fastest kept, for both stacks"
                   " (default: 5 on CPU, whose shared caches and memory make single runs noisy; 2 on CUDA)")
    p.add_argument("--image", action="store_true", help="also time one image with 3-way CFG + VQGAN decode (512x512)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers competitor")
    p.add_argument("--hf-caches", type=names_of("dynamic", "static"), default="dynamic,static", help="transformers' caches to time: dynamic (its default), static")
    p.add_argument("--no-fuse", action="store_true", help="GPU: keep q/k/v and w1/w3 as separate matrices (ablation)")
    p.add_argument("--profile", type=positive_int, default=0, metavar="N", help="also profile our first row's decode of N tokens (kernel table)")
    p.add_argument("--sdpa-backend", default=None, choices=sorted(SDPA_BACKENDS), help=(
        "experiment: restrict F.scaled_dot_product_attention to one backend for the whole run, both stacks "
        "(math: plain matmul/softmax, which inductor compiles and fuses; efficient and cudnn: CUDA only; default: "
        "PyTorch's choice, cuDNN on an H200)"))
    p.add_argument("--graph-steps", type=positive_int, default=None, metavar="N", help=(
        "experiment: our greedy decode replays CUDA graphs of N steps captured by the generator, instead of "
        "torch.compile's one-step reduce-overhead graphs (GenerationOptions.graph_steps)"))
    p.add_argument("--triton", action="store_true", help=(
        "experiment: at batch 1, also time our greedy decode on the fused Triton kernels (chameleon/kernels.py, "
        "GenerationOptions(kernels='triton'), replaying graphs of --triton-graph-steps steps), in turns with the default path"))
    p.add_argument("--triton-graph-steps", type=positive_int, default=16, metavar="N", help="with --triton: steps per captured graph (default 16)")
    p.add_argument("--json", type=json_path, default=None, help="write the results here too")
    a = p.parse_args()
    if a.new_tokens < 2:
        p.error(f"argument --new-tokens: at least 2 (decode time = that of N tokens - that of 1), got {a.new_tokens}")
    if a.no_fuse and a.device.type == "cpu":
        p.error("argument --no-fuse: CUDA only (on the CPU the weights are always fused, as chameleon.load does)")
    if a.sdpa_backend in ("efficient", "cudnn") and a.device.type == "cpu":  # (torch's CPU SDPA: math or flash)
        p.error(f"argument --sdpa-backend: {a.sdpa_backend} is CUDA only; on the CPU only math applies")
    args = dataclasses.replace(preset(a.preset), max_seq_len=4096 if a.image else 1024, model_parallel_size=1)
    if a.shape:
        items = [item.partition("=") for item in a.shape.split(",") if item]
        if not all(eq and value.strip().isdigit() for _, eq, value in items):
            p.error(f"argument --shape: expected name=integer pairs separated by commas, got {a.shape!r}")
        try:  # ModelArgs checks the names and that the shape is consistent
            args = ModelArgs.from_dict({**dataclasses.asdict(args), **{key: int(value) for key, _, value in items}}, "--shape")
        except InputError as err:
            p.error(str(err))
    if a.prompt_len + a.new_tokens > args.max_seq_len:
        p.error(f"arguments --prompt-len {a.prompt_len} + --new-tokens {a.new_tokens} exceed the benchmark's context of {args.max_seq_len}")
    if a.triton and a.device.type == "cpu":  # a rehearsal: the kernels in Triton's interpreter, chosen before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Chosen when a step is compiled, so it must hold from the start: entered for the whole run,
    # with the context manager kept (a dropped one is closed at once, restoring every backend).
    restricted = contextlib.ExitStack()
    if a.sdpa_backend:
        restricted.enter_context(sdpa_kernel(SDPA_BACKENDS[a.sdpa_backend]))
    device = a.device
    dtypes = a.dtypes or (["bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    torch.manual_seed(0)
    args.vocab_size = max(args.vocab_size, 65536)  # the real vocabulary (the tiny preset has 4,096)
    # The real VQGAN shape when timing images; otherwise a small one with the real 8,192 codes.
    vq = VQGANConfig() if a.image else dataclasses.replace(TINY_VQ, n_embed=8192)
    compile_ = device.type == "cuda"
    repeats = a.repeats or (2 if device.type == "cuda" else 5)
    report = {"machine": platform.processor() or platform.machine(), "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
              "preset": a.preset, "shape": a.shape, "fused": not a.no_fuse, "sdpa_backend": a.sdpa_backend or "default", "sdpa_enabled": sdpa_enabled(), "graph_steps": a.graph_steps, "triton": a.triton, "triton_graph_steps": a.triton_graph_steps if a.triton else None, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": repeats, "rows": []}

    def save(report):
        if a.json:
            a.json.write_text(json.dumps(report, indent=2))

    bw = None
    if device.type == "cuda":  # measured first, on an empty GPU
        bw = copy_bandwidth(device)
        report["copy_bandwidth_GBps"] = bw / 1e9
    last_logits = {}  # per dtype: each stack's text logits after one prompt, to compare precision
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        ours, hf = build_pair(args, vq, device, dtype, with_hf=not a.no_hf, fuse=not a.no_fuse)
        last_logits[dtype_name] = text_logits(ours, hf, a.prompt_len, device)
        report["params"] = sum(p.numel() for p in ours.transformer.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.transformer.parameters())
        for batch in a.batches:
            row = {"dtype": dtype_name, "batch": batch}
            report["rows"].append(row)  # filled in place; saved as it grows
            prompts = random_prompts(ours.tokenizer, batch, a.prompt_len, seed=0).tolist()
            competitors = [ours_competitor(ours, prompts, compile_, a.graph_steps)]
            if a.triton and batch == 1:
                competitors.append(ours_competitor(ours, prompts, compile_, a.triton_graph_steps, "triton"))
            if hf is not None:
                competitors += [hf_competitor(hf, prompts, device, cache, ours.tokenizer) for cache in ("dynamic", "static") if cache in a.hf_caches]
            for speeds, outputs in time_side_by_side(competitors, batch, a.prompt_len, a.new_tokens, device, repeats):
                row.update(compare(speeds, outputs, weight_bytes, bw, batch))
                save(report)  # a long GPU run keeps what it has measured if it is cut short
            print(json.dumps(row, indent=1), flush=True)
            if a.profile and len(report["rows"]) == 1:
                for kernels, steps in (("torch", a.graph_steps), ("triton", a.triton_graph_steps))[: 2 if a.triton and batch == 1 else 1]:
                    print(f"profile, kernels={kernels}:", flush=True)
                    profile_ours(ours, prompts, a.profile, device, compile_, steps, kernels)
        del hf
    if "fp32" in last_logits and "bf16" in last_logits:
        # bf16 greedy tokens of two stacks part at near-ties; what matters is that neither is less
        # precise: the error of each stack's bf16 logits against the fp32 ones.
        ref = last_logits["fp32"][0]
        report["bf16_logit_error_vs_fp32"] = {
            name: {"mean_abs": (t - ref).abs().mean().item(), "max_abs": (t - ref).abs().max().item()}
            for name, t in zip(("ours", "hf"), last_logits["bf16"]) if t is not None
        }
    if bw is not None:
        report["roofline_tok_s_b1"] = bw / weight_bytes
    if a.triton:  # the block sizes the kernels' first calls chose by timing
        from chameleon import kernels

        report["triton_configs"] = kernels.chosen_configs()
        report["triton_configs_file"] = os.environ.get(kernels.CONFIGS_ENV)  # (where they were read from and recorded)
    if a.image:
        tok = ours.tokenizer
        prompt = [[tok.bos_id] + tok.encode_text("A watercolor painting of a red fox in the snow.")]
        opts = GenerationOptions(mode="image", seed=0, compile=compile_)
        generate(ours, prompt, opts)  # warm-up
        t_gen, out = timed(lambda: generate(ours, prompt, opts), device)
        t_dec, _ = timed(lambda: ours.decode_output(out[0]), device)
        report["image_512"] = {"codes": ours.image_seq_len, "generate_s": t_gen, "ms_per_step": 1e3 * t_gen / (ours.image_seq_len + 2),
                               "vq_decode_s": t_dec, "total_s": t_gen + t_dec}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    save(report)


if __name__ == "__main__":
    main()
