"""Generation: KV cache equals recompute, batching, modes, guidance, sampling controls."""

from __future__ import annotations

import contextlib
import importlib
import re
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import cut_at_stop_strings, emulate_cuda_graphs
from chameleon import compiled_decode
from chameleon.config import preset
from chameleon.errors import InputError
from chameleon.generate import GenerationOptions, cfg_mix, generate
from chameleon.sampling import apply_repetition_penalty, filter_top_k_top_p
from chameleon.tiny import TINY_VQ, random_model

generate_module = importlib.import_module("chameleon.generate")  # the attribute chameleon.generate is the function
sampling_module = importlib.import_module("chameleon.sampling")
PROMPTS = ["Natalia sold clips to 48 of her friends", "Weng earns", "A robe takes 2 bolts of blue fiber and half that much white fiber."]


def test_kv_cache_decode_equals_full_recompute(tiny_model):
    ids = torch.tensor([tiny_model.encode_prompt(PROMPTS[2])])
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.new_cache(1, ids.shape[1])
        prefix = 7
        step_logits = [tiny_model(ids[:, :prefix], cache=cache, start_pos=0)]
        for pos in range(prefix, ids.shape[1]):
            step_logits.append(tiny_model(ids[:, pos : pos + 1], cache=cache, start_pos=pos))
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_shared_prefix_cache_rows(tiny_model):
    prefix = torch.tensor([tiny_model.encode_prompt("Question: how many clips?")])
    conts = [tiny_model.tokenizer.encode_text(t) for t in (" 72", " 48 clips", " none")]
    width = max(map(len, conts))
    with torch.no_grad():
        one = tiny_model.new_cache(1, prefix.shape[1] + width)
        tiny_model(prefix, cache=one)
        many = tiny_model.new_cache(len(conts), prefix.shape[1] + width)
        many.copy_rows_from(one)
        batch = torch.tensor([c + [tiny_model.tokenizer.pad_id] * (width - len(c)) for c in conts])
        got = tiny_model(batch, cache=many, start_pos=prefix.shape[1])
        for i, c in enumerate(conts):
            full = tiny_model(torch.cat([prefix, torch.tensor([c])], dim=1))[0, prefix.shape[1]:]
            torch.testing.assert_close(got[i, : len(c)], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_generation_equals_one_by_one(tiny_model, temperature):
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]  # different lengths: left padding
    opts = GenerationOptions(max_new_tokens=24, temperature=temperature, top_p=0.95, seed=3)
    batched = generate(tiny_model, prompts, opts)
    single = [generate(tiny_model, [p], opts)[0] for p in prompts]
    assert batched == single
    assert all(len(o) > 0 for o in batched)


def general_loop(**opts) -> GenerationOptions:
    """Options that run greedy text through the general per-row loop: interleaved mode with too few
    new tokens for an image (boi + 1024 codes + eoi) is text mode by another loop."""
    assert opts["max_new_tokens"] < 1026
    return GenerationOptions(mode="interleaved", **opts)


def test_greedy_device_loop_equals_general_loop(tiny_model):
    """Greedy text runs in a loop that stays on the device; the general per-row loop must give the
    same tokens, stops and lengths included."""
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    free = generate(tiny_model, prompts, GenerationOptions(max_new_tokens=20))
    stop = free[1][3]  # ends row 1 after three tokens, maybe others too
    base = dict(max_new_tokens=20, stop_ids=(stop,), logit_bias={free[0][0]: -5.0})
    fast = generate(tiny_model, prompts, GenerationOptions(**base))
    assert fast == generate(tiny_model, prompts, general_loop(**base))
    assert len(fast[1]) == 3 and stop not in sum(fast, []) and fast[0][0] != free[0][0]
    assert generate(tiny_model, prompts, GenerationOptions(max_new_tokens=0)) == [[], [], []]


@pytest.mark.parametrize("compile_", [False, True])
@pytest.mark.parametrize("look_every", [1, 16])
def test_greedy_stop_strings_on_the_device_loop(tiny_model, compile_, look_every, monkeypatch):
    """Greedy text with stop strings stays on the device loop, which looks at the host only every
    few steps (16 on a GPU, as forced here): each row must still end after the first token whose
    last 64 tokens decode to a text holding a stop string, as in the general loop."""
    generate_module = importlib.import_module("chameleon.generate")  # (chameleon.generate is also the function)
    monkeypatch.setattr(generate_module, "_host_look_every", lambda device: look_every)
    tok = tiny_model.tokenizer
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    free = generate(tiny_model, prompts, GenerationOptions(max_new_tokens=40))
    # Row 0 stops early, row 2 late (past a 16-step look), row 1 wherever these first occur.
    stops = (tok.decode_text(free[0][2:4]), tok.decode_text(free[2][30:32]))

    want = cut_at_stop_strings(tok.decode_text, free, stops)
    assert len(want[0]) <= 4 and len(want[2]) <= 32 and want != free
    opts = dict(max_new_tokens=40, stop_strings=stops)
    assert generate(tiny_model, prompts, GenerationOptions(compile=compile_, **opts)) == want
    assert generate(tiny_model, prompts, general_loop(**opts)) == want


@pytest.mark.parametrize("compile_", [False, True])
@pytest.mark.parametrize("sampling", [dict(temperature=0.9, top_k=50, top_p=0.9), dict(repetition_penalty=1.5),
                                      dict(temperature=0.9, top_p=0.9, repetition_penalty=1.3)], ids=["sampled", "penalty", "both"])
def test_text_picks_on_the_device_loop_equal_general_loop(tiny_model, compile_, sampling):
    """Sampled text and the repetition penalty run on the device loop too (each row drawing from
    its own seeded generator, seen tokens kept on the device); on CPU they must give the general
    loop's tokens, with top-k, top-p, stop ids and stop strings."""
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    base = dict(max_new_tokens=30, seed=5, **sampling)
    free = generate(tiny_model, prompts, GenerationOptions(**base))
    assert free == generate(tiny_model, prompts, general_loop(**base))
    stops = dict(stop_ids=(free[1][6],), stop_strings=(tiny_model.tokenizer.decode_text(free[0][3:5]),))
    want = generate(tiny_model, prompts, general_loop(**base, **stops))
    assert want != free and generate(tiny_model, prompts, GenerationOptions(compile=compile_, **base, **stops)) == want


def test_seeded_sampling_is_deterministic(tiny_model):
    prompt = [tiny_model.encode_prompt(PROMPTS[0])]
    a = generate(tiny_model, prompt, GenerationOptions(max_new_tokens=20, temperature=1.0, seed=1))
    b = generate(tiny_model, prompt, GenerationOptions(max_new_tokens=20, temperature=1.0, seed=1))
    c = generate(tiny_model, prompt, GenerationOptions(max_new_tokens=20, temperature=1.0, seed=2))
    assert a == b and a != c


def test_text_mode_never_yields_image_or_control_tokens(tiny_model):
    tok = tiny_model.tokenizer
    control = [tok.vocab[name] for name in ("<unk>", "<image>", "<pad>", "<s>")]
    # Push image codes, begin-of-image and control tokens to the top of the distribution: text mode
    # must still refuse them (Meta's text decoder samples none of them).
    bias = {int(t): 50.0 for t in tok.code_to_id[:50]} | {t: 50.0 for t in (tok.boi_id, *control)}
    outs = generate(tiny_model, [tiny_model.encode_prompt(p) for p in PROMPTS], GenerationOptions(max_new_tokens=40, temperature=1.0, logit_bias=bias))
    for out in outs:
        assert out and not any(tok.is_image_token(t) or t in (tok.boi_id, tok.eoi_id, *control) for t in out)
    # BPE tokens that merely start with '<' are text.
    assert not tok.non_text_ids[tok.vocab["<<"]] and tok.non_text_ids[tok.vocab["<image>"]]


def test_prompt_ending_in_begin_of_image_continues_that_image(tiny_model):
    """As Meta's image decoder reads such a prompt: the boi is not doubled; it opens the output's image."""
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    ids = tiny_model.encode_prompt("Draw a cat")
    image = GenerationOptions(mode="image", seed=3)
    out = generate(tiny_model, [ids + [tok.boi_id]], image)[0]
    assert out == generate(tiny_model, [ids], image)[0] and out.count(tok.boi_id) == 1 and len(out) == n + 2
    interleaved = GenerationOptions(mode="interleaved", max_new_tokens=n + 6, seed=3)
    out = generate(tiny_model, [ids + [tok.boi_id]], interleaved)[0]
    assert out[0] == tok.boi_id and out[n + 1] == tok.eoi_id and all(tok.is_image_token(t) for t in out[1 : n + 1])
    with pytest.raises(InputError, match="text mode cannot continue an image"):
        generate(tiny_model, [ids + [tok.boi_id]], GenerationOptions())
    with pytest.raises(InputError, match=f"max_new_tokens >= {n + 2}"):
        generate(tiny_model, [ids + [tok.boi_id]], GenerationOptions(mode="interleaved", max_new_tokens=n))
    with pytest.raises(InputError, match="prompt 1 is only an open image"):
        generate(tiny_model, [ids + [tok.boi_id], [tok.boi_id]], image)


@pytest.mark.parametrize("mode", ["image", "interleaved"])
@pytest.mark.parametrize("compile_", [False, True])
def test_prompt_ending_inside_an_image_continues_it(tiny_model, mode, compile_, monkeypatch):
    """A prompt ending in boi plus some codes: the output is that image, its given codes and then the
    rest, as if the model had drawn the given ones itself. Greedy codes with 3-way guidance give
    exactly the image of a free run; the batch may mix rows given 0, 1 or k codes (and, in image
    mode, a row with no image started). The given codes are prefilled, not fed a step each."""
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    ids = [tiny_model.encode_prompt(p) for p in PROMPTS]
    opts = GenerationOptions(mode=mode, max_new_tokens=n + 6, image_temperature=0.0, compile=compile_,
                             logit_bias={tok.boi_id: 100.0})  # interleaved: open an image at once
    free = generate(tiny_model, ids, opts)
    assert all(out[0] == tok.boi_id and out[n + 1] == tok.eoi_id for out in free)
    given = [ids[0] + free[0][:1], ids[1] + free[1][:2], ids[2] + free[2][: n // 2]]
    if mode == "image":
        given[0] = ids[0]
    out = generate(tiny_model, given, opts)
    assert [o[: n + 2] for o in out] == [f[: n + 2] for f in free]
    if mode == "image":
        assert all(len(o) == n + 2 for o in out)
    whole = generate(tiny_model, [ids[2] + free[2][: n + 1]], opts)[0]  # all codes given: only eoi follows
    assert whole[: n + 2] == free[2][: n + 2]
    steps = []
    decode_step = generate_module._decode_step
    monkeypatch.setattr(generate_module, "_decode_step", lambda *a: (lambda step: lambda *b: steps.append(1) or step(*b))(decode_step(*a)))
    half = generate(tiny_model, [given[2]], replace(opts, max_new_tokens=n + 2))[0]
    assert half == free[2][: n + 2] and len(steps) <= n - n // 2 + 2, len(steps)  # the codes left, eoi, and no more
    with pytest.raises(InputError, match="text mode cannot continue an image"):
        generate(tiny_model, given[1:], GenerationOptions())
    with pytest.raises(InputError, match="followed by other tokens than image codes"):
        generate(tiny_model, [ids[0] + [tok.boi_id] + tiny_model.encode_prompt("a cat", bos=False)], opts)


def test_image_mode_yields_exactly_one_image(tiny_model):
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    outs = generate(tiny_model, [tiny_model.encode_prompt(p) for p in PROMPTS[:2]], GenerationOptions(mode="image", max_new_tokens=5))
    for out in outs:
        assert len(out) == n + 2 and out[0] == tok.boi_id and out[-1] == tok.eoi_id
        assert all(tok.is_image_token(t) for t in out[1:-1])
    segments = tiny_model.decode_output(outs[0])
    assert len(segments) == 1 and segments[0].size == (tiny_model.vqgan.cfg.resolution,) * 2


def test_interleaved_text_image_text(tiny_model):
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    opts = GenerationOptions(mode="interleaved", max_new_tokens=n + 40, temperature=0.8, seed=0, logit_bias={tok.boi_id: 6.0})
    out = generate(tiny_model, [tiny_model.encode_prompt("Draw a cat:")], opts)[0]
    start = out.index(tok.boi_id)
    assert out[start + n + 1] == tok.eoi_id
    assert all(tok.is_image_token(t) for t in out[start + 1 : start + n + 1])
    kinds = [type(s).__name__ for s in tiny_model.decode_output(out)]
    assert "Image" in kinds
    # No image may start without room for all of its codes.
    short = generate(tiny_model, [tiny_model.encode_prompt("Draw:")], GenerationOptions(mode="interleaved", max_new_tokens=n, logit_bias={tok.boi_id: 50.0}))[0]
    assert tok.boi_id not in short


def test_stop_strings_and_ids(tiny_model):
    prompt = [tiny_model.encode_prompt(PROMPTS[0])]
    free = generate(tiny_model, prompt, GenerationOptions(max_new_tokens=30))[0]
    stop_id = free[5]
    cut = generate(tiny_model, prompt, GenerationOptions(max_new_tokens=30, stop_ids=(stop_id,)))[0]
    assert cut == free[: free.index(stop_id)]
    text = tiny_model.tokenizer.decode_text(free)
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = generate(tiny_model, prompt, GenerationOptions(max_new_tokens=30, stop_strings=(needle,)))[0]
    assert len(stopped) < len(free) and needle in tiny_model.tokenizer.decode_text(stopped)


def test_generation_options_are_checked(tiny_model):
    prompt = [tiny_model.encode_prompt(PROMPTS[0])]
    vocab = tiny_model.config.vocab_size
    for bad in (vocab, -1, "boi", 2.0):
        with pytest.raises(InputError, match=re.escape(f"logit_bias: {bad!r} is not a token id: expected integers 0..{vocab - 1}")):
            generate(tiny_model, prompt, GenerationOptions(max_new_tokens=2, logit_bias={bad: 5.0}))
    with pytest.raises(InputError, match=re.escape("stop id '2' is not a token id")):
        generate(tiny_model, prompt, GenerationOptions(max_new_tokens=2, stop_ids=["2"]))
    # decimal strings are ids (JSON's keys: generation.json's options read back)
    assert GenerationOptions(logit_bias={"7": 1.5}).logit_bias == {7: 1.5}
    with pytest.raises(InputError, match="top_k must be >= 0"):
        GenerationOptions(top_k=-3)
    with pytest.raises(InputError, match="stop_strings must be non-empty strings"):
        GenerationOptions(stop_strings=("",))
    with pytest.raises(InputError, match=r"stop_strings must be non-empty strings .* got \[None\]"):
        GenerationOptions(stop_strings=[None])
    with pytest.raises(InputError, match=r"logit_bias\[5\] must be a finite number or -inf"):
        GenerationOptions(logit_bias={5: float("inf")})
    GenerationOptions(logit_bias={5: float("-inf")})  # bans token 5
    with pytest.raises(InputError, match="temperature must be a finite number >= 0, got '0.7'"):
        GenerationOptions(temperature="0.7")
    with pytest.raises(InputError, match="temperature must be a finite number >= 0"):
        GenerationOptions(temperature=10**400)  # beyond float range
    numpy_values = GenerationOptions(temperature=np.float32(0.7), cfg_text_scale=np.int64(3), logit_bias={5: np.float32(-np.inf)})
    assert numpy_values.logit_bias == {5: float("-inf")}
    assert GenerationOptions(stop_strings="\n\n").stop_strings == ("\n\n",)  # one string, not its characters


def test_stop_ids_outside_the_vocabulary_are_refused(tiny_model):
    prompt = [tiny_model.encode_prompt(PROMPTS[0])]
    for bad in (tiny_model.config.vocab_size, -1):
        with pytest.raises(InputError, match=f"stop id {bad} is not a token id"):
            generate(tiny_model, prompt, GenerationOptions(max_new_tokens=4, temperature=0.9, stop_ids=(bad,)))


def test_cfg_mixing_formula():
    full, img, unc = torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0])
    # Worked by hand from the two-scale rule (InstructPix2Pix's, which Meta's image decoder uses):
    # token 0: 1 + 1.2 * (2 - 1) + 3 * (3 - 2) = 5.2; token 1: 0 + 1.2 * (2 - 0) + 3 * (1 - 2) = -0.6
    torch.testing.assert_close(cfg_mix(full, img, unc, s_txt=3.0, s_img=1.2), torch.tensor([5.2, -0.6]))
    # The scales are not interchangeable (1 + 3 * 1 + 1.2 * 1, 0 + 3 * 2 + 1.2 * -1), nor are the
    # image-only and full rows (1 + 1.2 * 2 + 3 * -1, 0 + 1.2 * 1 + 3 * 1).
    torch.testing.assert_close(cfg_mix(full, img, unc, s_txt=1.2, s_img=3.0), torch.tensor([5.2, 4.8]))
    torch.testing.assert_close(cfg_mix(img, full, unc, s_txt=3.0, s_img=1.2), torch.tensor([0.4, 4.2]))
    # Equal scales are ordinary guidance of the full row against the unconditional one.
    torch.testing.assert_close(cfg_mix(full, img, unc, 2.5, 2.5), unc + 2.5 * (full - unc))
    torch.testing.assert_close(cfg_mix(full, img, unc, 1.0, 1.0), full)  # no guidance: the full prompt
    torch.testing.assert_close(cfg_mix(full, img, unc, 0.0, 0.0), unc)


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    kept = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isinf(kept[2:]).all() and torch.isfinite(kept[:2]).all()
    probs = logits.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03]
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(kept[:2]).all() and torch.isinf(kept[2:]).all(), probs
    # Mass exactly at top_p: the tokens before reach it, so the next one goes (as transformers' TopP).
    kept = filter_top_k_top_p(torch.tensor([0.5, 0.25, 0.125, 0.125]).log(), top_k=0, top_p=0.75)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(torch.zeros(2), top_k=0, top_p=0.5)).sum() == 1
    seen = torch.tensor([True, False, True, False])
    pen = apply_repetition_penalty(torch.tensor([2.0, 2.0, -2.0, -2.0]), seen, 2.0)
    assert pen.tolist() == [1.0, 2.0, -4.0, -2.0]


def _grid_counts(probs: torch.Tensor, top_p: float, n: int) -> torch.Tensor:
    """How often each token of one (V,) row is drawn at n evenly spaced uniform numbers."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = sampling_module._draw(probs.expand(n, -1).contiguous(), top_p, u)
    return torch.bincount(picks, minlength=probs.shape[-1])


def _logits_shaped(shape: str, seed: int) -> torch.Tensor:
    """(1, 2000) logits: peaked, medium, flat, or a head of half the mass over a long tail."""
    g = torch.Generator().manual_seed(seed)
    if shape == "head_and_tail":
        probs = torch.full((1, 2000), 0.5 / 1999) * (1 + 0.01 * torch.randn(1, 2000, generator=g))
        probs[0, 7] = 0.5
        return probs.log()
    return torch.randn(1, 2000, generator=g) * {"peaked": 8.0, "medium": 3.0, "flat": 0.3}[shape]


@pytest.mark.parametrize("shape", ["peaked", "medium", "flat", "head_and_tail"])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 1.0), (50, 0.8), (0, 0.999)])
def test_draws_follow_the_filtered_distribution(monkeypatch, shape, top_k, top_p):
    """At evenly spaced uniform numbers, each token is drawn in proportion to its probability after
    top-k and top-p (the set filter_top_k_top_p keeps, and transformers' TopK/TopP warpers keep),
    to within one grid step: so no token outside the set is ever drawn. Top-p ranks a few
    candidates first, then more, then sorts everything: smaller steps here, for a small vocabulary;
    each route is taken."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    monkeypatch.setattr(sampling_module, "NUCLEUS_CANDIDATES", (16, 256))
    widths = []
    pick = sampling_module._nucleus_pick
    monkeypatch.setattr(sampling_module, "_nucleus_pick", lambda p, *a: widths.append(p.shape[-1]) or pick(p, *a))
    logits = _logits_shaped(shape, seed=top_k)
    kept = filter_top_k_top_p(logits, top_k, top_p)
    hf = logits
    if top_k:
        hf = TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1:
        hf = TopPLogitsWarper(top_p)(None, hf)
    assert torch.equal(torch.isfinite(kept), torch.isfinite(hf))
    n = 20_000
    counts = _grid_counts(sampling_module._top_k(logits, top_k).softmax(-1), top_p, n)
    assert (counts[~torch.isfinite(kept[0])] == 0).all()
    assert (counts - kept.softmax(-1)[0] * n).abs().max() <= 1.0 + 1e-6
    if (top_k, top_p) == (0, 0.9):  # 16 candidates, then 256, then all; all at once where 16 hold under half
        route = {"peaked": [16], "medium": [16, 256], "flat": [16, 2000], "head_and_tail": [16, 256, 2000]}[shape]
        assert widths == route, int(torch.isfinite(kept).sum())


def test_draw_rows_are_independent_of_their_batch():
    """A batch mixing rows whose nucleus is among the candidates and rows sorted whole picks, row by
    row, what each row picks alone (ties included); so does `sample`, which the per-row loop uses."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6000, generator=g) * torch.tensor([8.0, 0.2, 8.0, 0.2, 2.0, 0.5])[:, None]
    logits = logits.bfloat16().float()  # as a bf16 model's: many tied logits, whose order must not matter
    sizes = torch.isfinite(filter_top_k_top_p(logits / 0.9, 0, 0.9)).sum(-1)
    assert sorted({sum(int(s) > n for n in sampling_module.NUCLEUS_CANDIDATES) for s in sizes}) == [0, 1, 2], sizes
    seeds = range(6)
    batch = sampling_module.pick_rows(logits, 0.9, 0, 0.9, [torch.Generator().manual_seed(s) for s in seeds])
    alone = [sampling_module.sample(logits[i], 0.9, 0, 0.9, torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)]
    assert batch.tolist() == alone


def test_draw_at_the_ends_of_the_unit_interval_and_zero_weights():
    """Zero weights are never drawn, also where u * total comes out at total (u = 1 stands in for
    the rounding of a narrower float): the pick is then the last token with weight."""
    weights = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])
    for u, expected in ((0.0, 1), (0.2499, 1), (0.25, 3), (1 - 2**-53, 3), (1.0, 3)):
        assert int(sampling_module._invert_cdf(weights, torch.tensor([u], dtype=torch.float64))) == expected, u


def test_logit_bias_banning_every_text_token_is_refused(tiny_model):
    vocab = tiny_model.config.vocab_size
    banned = {t: float("-inf") for t in range(vocab)}
    with pytest.raises(InputError, match="logit_bias: -inf on every text token"):
        generate(tiny_model, [tiny_model.encode_prompt("Hi")], GenerationOptions(max_new_tokens=2, temperature=1.0, logit_bias=banned))


def test_compiled_decode_step_matches_eager(tiny_model):
    """The torch.compile path (default on CUDA) gives the same tokens; here compiled for CPU."""
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS[:2]]
    eager = generate(tiny_model, prompts, GenerationOptions(max_new_tokens=12))
    compiled = generate(tiny_model, prompts, GenerationOptions(max_new_tokens=12, compile=True))
    assert compiled == eager


def test_compiled_greedy_loop_stops_rows_like_eager(tiny_model):
    """Compiled greedy text picks inside the graph: rows of different lengths that stop at
    different steps (past the 16-step check of whether all ended), calls with another batch size
    in between, and a repeated call all give the eager loop's tokens."""
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS[:3]]
    free = generate(tiny_model, prompts, GenerationOptions(max_new_tokens=40))
    stop = free[1][20]  # ends row 1 at its 21st token; other rows wherever it occurs first
    opts = dict(max_new_tokens=40, stop_ids=(stop,))
    eager = generate(tiny_model, prompts, GenerationOptions(**opts))
    assert any(len(o) < 40 for o in eager) and eager != free
    compiled = GenerationOptions(compile=True, **opts)
    assert generate(tiny_model, prompts, compiled) == eager
    assert generate(tiny_model, prompts[:1], compiled) == eager[:1]
    assert generate(tiny_model, prompts, compiled) == eager
    assert generate(tiny_model, prompts, GenerationOptions(max_new_tokens=40, compile=True)) == free


@pytest.mark.parametrize("graph_steps", [1, 6, 16])
def test_compiled_greedy_steps_in_calls_of_several(tiny_model, graph_steps, monkeypatch):
    """`graph_steps` runs the compiled greedy step N steps a call (on CUDA, one graph replay; here
    the chunking alone, compiled for CPU): rows stopped by a stop id and by a stop string, looks
    every 16 steps as on a GPU, a budget that is no multiple of N, and a repeated call all give
    the eager loop's tokens."""
    monkeypatch.setattr(generate_module, "_host_look_every", lambda device: 16)
    tok = tiny_model.tokenizer
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    free = generate(tiny_model, prompts, GenerationOptions(max_new_tokens=37))
    stops = dict(stop_ids=(free[1][20],), stop_strings=(tok.decode_text(free[0][2:4]),))
    for opts in (dict(max_new_tokens=37), dict(max_new_tokens=37, **stops)):
        eager = generate(tiny_model, prompts, GenerationOptions(**opts))
        chunked = GenerationOptions(compile=True, graph_steps=graph_steps, **opts)
        assert generate(tiny_model, prompts, chunked) == eager == generate(tiny_model, prompts, chunked)
    assert eager != free and all(len(o) == 37 for o in free)
    # Up to the end of the context, where a call of N steps would overrun the cache.
    short = random_model(replace(preset("tiny"), max_seq_len=48), TINY_VQ, seed=1)
    prompt = [short.encode_prompt(PROMPTS[0])]
    opts = dict(max_new_tokens=48 - len(prompt[0]), logit_bias={short.tokenizer.eos_id: -1e9, short.tokenizer.eot_id: -1e9})
    eager = generate(short, prompt, GenerationOptions(**opts))
    assert len(eager[0]) == opts["max_new_tokens"] and generate(short, prompt, GenerationOptions(compile=True, graph_steps=graph_steps, **opts)) == eager
    with pytest.raises(InputError, match="graph_steps must be an integer >= 1"):
        GenerationOptions(graph_steps=0)


@pytest.mark.parametrize("graph_steps", [1, 6])
def test_greedy_graphs_bookkeeping_with_emulated_cuda_graphs(tiny_model, graph_steps, monkeypatch):
    """`_GreedyGraphs` on CPU, with torch's CUDA graph API emulated: a capture records the steps
    without running them (the tensors they write are restored after it), a replay runs them.
    Warm-up steps, captures (one per size, the cuBLAS workspaces emptied before and after each),
    replays and the reuse of graphs across calls give the eager tokens; each cache shape keeps its
    graphs (the KEPT_SHAPES used last), and they are captured anew after a change of the global
    state dynamo guards on, and for a cache at other addresses."""
    events = []

    def of_shape(n_rows):
        return next(g for (rows, *_, kind), g in tiny_model.transformer._greedy_graphs.items() if rows == n_rows and kind == "inductor")

    emulate_cuda_graphs(monkeypatch, tiny_model.transformer, events)
    monkeypatch.setattr(generate_module, "_host_look_every", lambda device: 16)

    tok = tiny_model.tokenizer
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    opts = dict(max_new_tokens=39, logit_bias={tok.eos_id: -1e9, tok.eot_id: -1e9})
    eager = generate(tiny_model, prompts, GenerationOptions(**opts))
    graphed = GenerationOptions(compile=True, graph_steps=graph_steps, **opts)
    generate_module.free_generation_buffers(tiny_model)
    assert generate(tiny_model, prompts, graphed) == eager
    graphs = of_shape(len(prompts))
    # 38 steps: warm-up (3 calls of 1, or 1 call of 6), then calls of N while they fit, then of 1.
    sizes = {graph_steps, 1}
    assert set(graphs.graphs) == sizes and events == ["clear", "capture", f"captured {graph_steps}", "clear"] + (
        ["clear", "capture", "captured 1", "clear"] if graph_steps > 1 else [])
    assert graphs.warm == (3 if graph_steps == 1 else graph_steps)
    captured, events[:] = dict(graphs.graphs), []
    assert generate(tiny_model, prompts, graphed) == eager  # replays only
    assert of_shape(len(prompts)) is graphs and graphs.graphs == captured and events == []
    one = [generate(tiny_model, prompts[:1], GenerationOptions(**opts))[0]]
    assert generate(tiny_model, prompts[:1], graphed) == one and "capture" in events  # another shape: its own graphs
    assert of_shape(1) is not graphs and len(tiny_model.transformer._greedy_graphs) == 2
    events[:] = []
    assert generate(tiny_model, prompts, graphed) == eager and of_shape(len(prompts)) is graphs and events == []  # kept
    monkeypatch.setattr(compiled_decode._GreedyGraphs, "KEPT_SHAPES", 2)
    assert generate(tiny_model, prompts[:2], graphed) == [generate(tiny_model, prompts[:2], GenerationOptions(**opts))[0],
                                                          generate(tiny_model, prompts[1:2], GenerationOptions(**opts))[0]]
    assert [rows for rows, *_ in tiny_model.transformer._greedy_graphs] == [len(prompts), 2]  # 1 row, used least recently, dropped
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    try:
        assert generate(tiny_model, prompts, graphed) == eager
        assert of_shape(len(prompts)) is not graphs  # not replayed under another global state
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    graphs = of_shape(len(prompts))
    generate_module.free_generation_buffers(tiny_model)  # the cache at other addresses next time
    assert generate(tiny_model, prompts, graphed) == eager and of_shape(len(prompts)) is not graphs
    generate_module.free_generation_buffers(tiny_model)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy step", "logits step"])
@pytest.mark.parametrize("context, limits", [(232, dict(recompile_limit=2)), (240, dict(recompile_limit=1, accumulated_recompile_limit=2))],
                         ids=["per-function limit", "process-wide limit"])
def test_compiled_steps_compile_past_dynamos_limits(tiny_model, sampled, context, limits):
    """Every cache shape is compiled once; a suite meets more than dynamo's default limit of 8
    shapes per function, past which a fullgraph compile is a hard error. Dynamo also caps the
    compilations of one code object over the process (256 by default), and every model's compiled
    step shares its code object (a fixed raised limit of 64 failed on the 65th shape of one
    model). With each limit lowered here to meet it sooner, each shape must compile, and give the
    eager tokens. (A context of its own gives shapes no other test compiles: a step compiled for
    another model of the same shapes serves this one, and would leave nothing to compile here.)"""
    model = random_model(replace(preset("tiny"), max_seq_len=context), TINY_VQ, seed=2)
    prompt = model.encode_prompt(PROMPTS[0])
    opts = dict(max_new_tokens=4, **(dict(temperature=0.9, seed=3) if sampled else {}))
    with torch._dynamo.config.patch(**limits):
        for rows in (1, 2, 3, 4):
            compiled = _compilations()
            assert generate(model, [prompt] * rows, GenerationOptions(compile=True, **opts)) == generate(model, [prompt] * rows, GenerationOptions(**opts))
            assert _compilations() == compiled + 1


def _compilations() -> int:
    """Graphs dynamo has compiled in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_generation_reuses_its_cache(tiny_model):
    """CUDA graphs are recorded against the cache's addresses (torch.compile's graph trees keep a
    recording per new address): each shape's cache, and its greedy state, keep their addresses
    however shapes alternate between calls, and reused ones give the eager tokens. A larger shape
    grows the buffers behind them all."""
    model = random_model(preset("tiny"), TINY_VQ, seed=5)
    prompts = [model.encode_prompt(p) for p in PROMPTS]

    def addresses():
        cache = model.transformer._cache_store.caches
        states = model.transformer._greedy_states
        return ({shape: [t.data_ptr() for t in c.tensors()] for shape, c in cache.items()},
                {key[:2]: [t.data_ptr() for t in vars(s).values()] for key, s in states.items()})

    seen = None
    for rows, n in [(2, 6), (1, 6), (2, 5), (1, 300), (2, 6), (1, 300), (1, 6)]:  # 300: a second slot bucket
        opts = dict(max_new_tokens=n, logit_bias={model.tokenizer.eos_id: -1e9})
        assert generate(model, prompts[:rows], GenerationOptions(compile=True, **opts)) == generate(model, prompts[:rows], GenerationOptions(**opts))
        now = addresses()
        if seen is not None:
            assert all(now[i][shape] == seen[i][shape] for i in (0, 1) for shape in seen[i])  # kept, not moved
        seen = now
    assert set(seen[0]) == {(2, 256), (1, 256), (1, 512)} == set(seen[1])
    store = model.transformer._cache_store
    generate(model, prompts, GenerationOptions(max_new_tokens=300, compile=True))  # 3 x 512 slots: more than the buffers hold
    assert model.transformer._cache_store is not store and model.transformer._cache_store.size == 3 * 512


def test_cache_buffers_freed_before_new_ones_are_allocated(monkeypatch):
    """A cache store replaced (a larger shape; or buffers made under torch.inference_mode(), met
    outside it) is freed before its successor is allocated: a 7B cache is tens of GB, and both at
    once would double the peak."""
    model = random_model(preset("tiny"), TINY_VQ, seed=6)
    transformer, alive = model.transformer, []
    init = compiled_decode._CacheStore.__init__

    def tracked_init(self, *args, **kwargs):
        alive.append([ref() is not None for ref in refs])
        init(self, *args, **kwargs)

    monkeypatch.setattr(compiled_decode._CacheStore, "__init__", tracked_init)
    refs = []
    compiled_decode._reusable_cache(transformer, 1, 256)
    refs = [weakref.ref(t) for t in transformer._cache_store.k]
    compiled_decode._reusable_cache(transformer, 2, 256)  # grows
    with torch.inference_mode():
        refs = [weakref.ref(t) for t in transformer._cache_store.k]
        compiled_decode._reusable_cache(transformer, 3, 256)  # grows, inference tensors
    refs = [weakref.ref(t) for t in transformer._cache_store.k]
    compiled_decode._reusable_cache(transformer, 3, 256)  # outside: not writable, allocated afresh
    assert alive == [[], [False, False], [False, False], [False, False]]


def test_new_shapes_allowed_under_torchs_older_limit_names(monkeypatch):
    """torch < 2.7 (README allows 2.5.1) names dynamo's limits cache_size_limit and
    accumulated_cache_size_limit, and has no recompile_limit: the first call on a cache must not
    fail there, and raises those."""
    patched = {}

    class OldConfig:
        cache_size_limit, accumulated_cache_size_limit = 8, 5000

        @staticmethod
        def patch(**changes):
            patched.update(changes)
            return contextlib.nullcontext()

    monkeypatch.setattr(torch._dynamo, "config", OldConfig)
    with compiled_decode._new_shapes_allowed():
        pass
    assert patched == {"cache_size_limit": compiled_decode.RECOMPILE_LIMIT, "accumulated_cache_size_limit": 5000}


@pytest.mark.parametrize("sampled", [False, True])
def test_compiled_generation_after_one_in_inference_mode(tiny_model, sampled):
    """The cache (and greedy state) kept on the model by a compiled generation run under
    torch.inference_mode() are inference tensors: a later generation outside it must not update
    them in place (an error), and gives the eager tokens; so does one inside it again."""
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS[:2]]
    opts = dict(max_new_tokens=6, **(dict(temperature=0.9, seed=3) if sampled else {}))
    eager = generate(tiny_model, prompts, GenerationOptions(**opts))
    compiled = GenerationOptions(compile=True, **opts)
    with torch.inference_mode():
        assert generate(tiny_model, prompts, compiled) == eager
    assert generate(tiny_model, prompts, compiled) == eager
    with torch.inference_mode():
        assert generate(tiny_model, prompts, compiled) == eager


@pytest.mark.parametrize("mode", ["image", "interleaved"])
def test_guided_batches_equal_one_by_one(tiny_model, mode):
    """Rows of one batch may be in different phases (text, image, done): each is computed as if alone."""
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    opts = GenerationOptions(mode=mode, max_new_tokens=n + 30, temperature=0.8, seed=5, logit_bias={tok.boi_id: 3.0})
    batched = generate(tiny_model, prompts, opts)
    single = [generate(tiny_model, [p], opts)[0] for p in prompts]
    assert batched == single
    if mode == "interleaved":  # the case worth testing: rows opened their images at different steps
        starts = [out.index(tok.boi_id) for out in batched if tok.boi_id in out]
        assert len(set(starts)) >= 2, starts


@pytest.mark.parametrize("compile_", [False, True])
@pytest.mark.parametrize("image_temperature,guided", [(0.7, True), (0.0, True), (0.7, False)])
def test_interleaved_image_codes_in_lockstep_equal_per_row(tiny_model, monkeypatch, compile_, image_temperature, guided):
    """Interleaved generation hands the codes to a lockstep device block while every row still going
    is inside an image: the same tokens as choosing every code in the per-row loop. Here rows 0 and
    1 open their images at different steps, row 2 ends (a stop id) before either does, and the
    second image goes on after the first is over."""
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    scales = {} if guided else dict(cfg_text_scale=1.0, cfg_image_scale=1.0)
    base = dict(mode="interleaved", max_new_tokens=n + 30, temperature=0.8, seed=1, logit_bias={tok.boi_id: 4.0},
                image_temperature=image_temperature, compile=compile_, **scales)
    free = generate(tiny_model, prompts, GenerationOptions(**base))
    opts = GenerationOptions(**base, stop_ids=(free[2][10],))
    blocks = []
    block = generate_module._image_block
    monkeypatch.setattr(generate_module, "_image_block", lambda n_codes, *a: blocks.append(n_codes) or block(n_codes, *a))
    lockstep = generate(tiny_model, prompts, opts)
    starts = [out.index(tok.boi_id) if tok.boi_id in out else None for out in lockstep]
    first, second = sorted(starts[:2])
    assert first < second and starts[2] is None and len(lockstep[2]) <= 10, starts
    assert blocks == [n - (second - first)]  # from the second boi to the end of the first image
    monkeypatch.setattr(generate_module, "LOCKSTEP_MIN_CODES", 10**9)
    assert generate(tiny_model, prompts, opts) == lockstep


def test_interleaved_codes_independent_of_batch_with_a_separate_code_generator(tiny_model, monkeypatch):
    """Off the CPU a row draws its image codes from a device generator and its text from its CPU
    one; whether its codes run in a lockstep block or in the per-row loop depends on the other rows
    of its batch. Emulated here with a second CPU generator for codes: a row's output must not
    depend on its batch."""

    def code_generator(r, device):
        if r.device_generator is None:
            r.device_generator = torch.Generator().manual_seed(r.seed + 1)
        return r.device_generator

    monkeypatch.setattr(generate_module, "_row_generator", code_generator)
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS]
    opts = GenerationOptions(mode="interleaved", max_new_tokens=n + 30, temperature=0.8, seed=1, logit_bias={tok.boi_id: 4.0})
    batched = generate(tiny_model, prompts, opts)
    assert batched == [generate(tiny_model, [p], opts)[0] for p in prompts]
    assert len({out.index(tok.boi_id) for out in batched}) == 3  # images opened at three different steps
    # Two images per row: the guidance rows must have seen all of the first image's codes, whichever
    # path chose its last one.
    two = GenerationOptions(mode="interleaved", max_new_tokens=2 * (n + 2) + 20, temperature=0.8, seed=3, logit_bias={tok.boi_id: 5.0})
    batched = generate(tiny_model, prompts[:2], two)
    assert batched == [generate(tiny_model, [p], two)[0] for p in prompts[:2]]
    assert sum(out.count(tok.boi_id) for out in batched) >= 3


def test_interleaved_second_image_lockstep_equals_per_row(tiny_model, monkeypatch):
    """A guided row's second image follows a first whose every code, the last included, reached
    the guidance rows, in the per-row loop as in a lockstep block."""
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    prompt = [tiny_model.encode_prompt(PROMPTS[0])]
    for temperature in (0.0, 0.7):
        opts = GenerationOptions(mode="interleaved", max_new_tokens=2 * (n + 2) + 4, logit_bias={tok.boi_id: 100.0}, image_temperature=temperature)
        monkeypatch.setattr(generate_module, "LOCKSTEP_MIN_CODES", 2)
        lockstep = generate(tiny_model, prompt, opts)
        monkeypatch.setattr(generate_module, "LOCKSTEP_MIN_CODES", 10**9)
        assert generate(tiny_model, prompt, opts) == lockstep
        assert lockstep[0].count(tok.boi_id) == 2


def test_compiled_greedy_with_no_new_tokens_at_a_cache_boundary(tiny_model):
    """A prompt that fills a whole cache bucket leaves no slot for a first token: nothing to do."""
    prompt = [tiny_model.tokenizer.bos_id] + [7] * 255
    assert generate(tiny_model, [prompt], GenerationOptions(max_new_tokens=0, compile=True)) == [[]]
    assert generate(tiny_model, [prompt], GenerationOptions(max_new_tokens=0)) == [[]]


@pytest.mark.parametrize("compile_", [False, True])
def test_each_image_gets_a_fresh_unconditional_row(tiny_model, compile_):
    """Guidance streams as Meta's image decoder builds them for every image: the full sequence; the
    image-only one (`<s>` plus every image so far); and the unconditional `<s> boi` plus the current
    image's codes. Checked by recomputing the three streams from scratch for greedy codes of the
    first and the second image of one output, also when the first image was given in part."""
    tok, n = tiny_model.tokenizer, tiny_model.image_seq_len
    prompt = tiny_model.encode_prompt(PROMPTS[1])
    opts = GenerationOptions(mode="interleaved", max_new_tokens=2 * (n + 2) + 2, logit_bias={tok.boi_id: 100.0}, image_temperature=0.0, compile=compile_)
    out = generate(tiny_model, [prompt], opts)[0]
    starts = [i for i, t in enumerate(out) if t == tok.boi_id]
    assert len(starts) == 2
    image_tokens = {tok.boi_id, tok.eoi_id, *tok.code_to_id.tolist()}
    for start in starts:
        for k in (start + 1, start + 2, start + 7):  # the first codes of the image
            sofar = prompt + out[:k]
            streams = [sofar, [tok.bos_id] + [t for t in sofar if t in image_tokens], [tok.bos_id] + out[start:k]]
            with torch.no_grad():
                last = [tiny_model(torch.tensor([s]))[0, -1, tok.code_to_id] for s in streams]
            expected = tok.code_to_id[cfg_mix(*last, opts.cfg_text_scale, opts.cfg_image_scale).argmax()]
            assert out[k] == expected, (start, k)
    # Continued from inside the first image (its given codes prefilled), the second image's
    # unconditional row holds none of the first: the same output.
    assert generate(tiny_model, [prompt + out[: starts[0] + 1 + n // 2]], opts)[0] == out


def test_image_only_row_keeps_every_bos_of_the_prompt(tiny_model, monkeypatch):
    """Meta's image-conditioned row is the context filtered to `<s>`, boi, eoi and image codes, so a
    prompt of two documents (each opened by `<s>`) keeps both `<s>`, each where it stood; it was
    one `<s>` before all the images. Checked on the logits each guidance row gives the mix for the
    first codes of an image, against the three rows recomputed from scratch."""
    from PIL import Image

    from conftest import PHOTO

    tok = tiny_model.tokenizer
    prompt = tiny_model.encode_prompt([Image.open(PHOTO), "A cat on a mat."]) + tiny_model.encode_prompt("Draw it again:")
    assert prompt.count(tok.bos_id) == 2
    mixed = []
    mix = generate_module.cfg_mix
    monkeypatch.setattr(generate_module, "cfg_mix", lambda *a: mixed.append([x[0].clone() for x in a[:3]]) or mix(*a))
    out = generate(tiny_model, [prompt], GenerationOptions(mode="image", image_temperature=0.0))[0]
    keep = {tok.bos_id, tok.boi_id, tok.eoi_id, *tok.code_to_id.tolist()}
    image_only = [t for t in prompt if t in keep]
    assert image_only.count(tok.bos_id) == 2 and image_only[0] == tok.bos_id
    for k in (1, 2, 5):  # out[0] is boi; mixed[k - 1] chose out[k]
        streams = [prompt + out[:k], image_only + out[:k], [tok.bos_id] + out[:k]]
        with torch.no_grad():
            expected = [tiny_model(torch.tensor([s]))[0, -1, tok.code_to_id] for s in streams]
        for got, want in zip(mixed[k - 1], expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert generate_module._image_only_prompt(tok.encode_text("no bos, no image"), tok) == [tok.bos_id]


def test_repetition_penalty_counts_begin_of_image_once_an_image_is_in_context(tiny_model, monkeypatch):
    """Meta's text decoder penalises every token of its context, so in interleaved mode begin-of-image
    too once an image is there (in the prompt, or generated): with boi's logit just above the best
    penalised text logit, a text-only prompt opens an image, the same text after an image does not;
    and after a generated image the next text step sees boi as seen."""
    from PIL import Image

    from conftest import PHOTO

    tok, n, vocab = tiny_model.tokenizer, tiny_model.image_seq_len, tiny_model.config.vocab_size
    penalty = 2.0
    firsts = []
    for prompt in (tiny_model.encode_prompt("Draw a cat:"), tiny_model.encode_prompt([Image.open(PHOTO), "Draw a cat:"])):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt]))[0, -1]
        text = logits.masked_fill(generate_module.non_text_mask(tok, vocab, logits.device), float("-inf"))
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[prompt] = True
        best = float(apply_repetition_penalty(text, seen, penalty).max())
        # boi above the best text token unpenalised, below it penalised (x / 2 or x * 2).
        bias = best + 0.2 * abs(best) - float(logits[tok.boi_id])
        opts = GenerationOptions(mode="interleaved", max_new_tokens=n + 2, repetition_penalty=penalty, logit_bias={tok.boi_id: bias})
        firsts.append(generate(tiny_model, [prompt], opts)[0][0])
    assert firsts[0] == tok.boi_id and firsts[1] != tok.boi_id

    boi_seen = []
    penalise = sampling_module.apply_repetition_penalty
    monkeypatch.setattr(generate_module, "apply_repetition_penalty", lambda x, s, p: boi_seen.append(bool(s[tok.boi_id])) or penalise(x, s, p))
    opts = GenerationOptions(mode="interleaved", max_new_tokens=n + 4, repetition_penalty=1.2, logit_bias={tok.boi_id: 100.0})
    out = generate(tiny_model, [tiny_model.encode_prompt("Draw a cat:")], opts)[0]
    assert out[0] == tok.boi_id and out[n + 1] == tok.eoi_id and boi_seen[0] is False and boi_seen[1:] and all(boi_seen[1:])


def test_free_generation_buffers(tiny_model):
    """What compiled generation keeps on the model (cache buffers, greedy states) is freed on
    request, and the next compiled call allocates it again with the same tokens."""
    import weakref

    prompts = [tiny_model.encode_prompt(p) for p in PROMPTS[:2]]
    opts = GenerationOptions(max_new_tokens=5, compile=True)
    first = generate(tiny_model, prompts, opts)
    kept = [weakref.ref(t) for t in [*tiny_model.transformer._cache_store.k, tiny_model.transformer._cache_store.valid]]
    kept += [weakref.ref(s.out) for s in tiny_model.transformer._greedy_states.values()]
    generate_module.free_generation_buffers(tiny_model)
    assert all(r() is None for r in kept)
    assert generate(tiny_model, prompts, opts) == first
