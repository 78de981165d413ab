"""The CUDA path: logits on the GPU, the CUDA-graph decode step (torch.compile, reduce-overhead),
sampled generation there, and the device text loop with stop strings. CI has no GPU, so these are
skipped there; `benchmarks/perf/gpu_check.sh` runs them first on a lent GPU machine."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.utils import counters

import chameleon
from conftest import cut_at_stop_strings
from chameleon.generate import GenerationOptions, generate

generate_module = importlib.import_module("chameleon.generate")  # the attribute chameleon.generate is the function

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/perf/gpu_check.sh)")

PROMPTS = ["A photo of a cat sitting on a mat.", "Hi", "Describe the weather in three words, please."]


def _graphs_of(model, n_rows):
    """The captured greedy graphs (`_GreedyGraphs`) of the compiled step on the model's cache with n_rows rows."""
    return next(g for (rows, *_, kind), g in model.transformer._greedy_graphs.items() if rows == n_rows and kind == "inductor")


@pytest.fixture(scope="module")
def gpu_model(tiny_hf):
    torch.backends.cuda.matmul.allow_tf32 = False  # compare against CPU float32 at float32 precision
    return chameleon.load(tiny_hf, device="cuda", dtype=torch.float32)


def test_gpu_logits_match_cpu(tiny_model, gpu_model):
    ids = torch.tensor([tiny_model.encode_prompt(PROMPTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(gpu_model(ids.cuda()).cpu(), tiny_model(ids), rtol=1e-4, atol=1e-4)


def test_cuda_graph_greedy_matches_eager(gpu_model, tiny_model):
    """Batched prompts of different lengths: the CUDA-graph step gives the eager step's tokens, on
    every replay, and the CPU's."""
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS]
    opts = dict(max_new_tokens=20, logit_bias={gpu_model.tokenizer.eos_id: -1e9})
    eager = generate(gpu_model, prompts, GenerationOptions(compile=False, **opts))
    skips = counters["inductor"]["cudagraph_skips"]
    graphed = generate(gpu_model, prompts, GenerationOptions(compile=True, **opts))
    again = generate(gpu_model, prompts, GenerationOptions(compile=True, **opts))
    assert graphed == eager == again
    # The greedy step mutates its state and the cache in place: CUDA graphs must not give up on it.
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert all(len(o) == 20 for o in graphed)
    assert generate(tiny_model, prompts, GenerationOptions(**opts)) == eager


def test_compiled_generation_over_alternating_shapes(gpu_model, monkeypatch):
    """As harness batches alternate cache shapes (batch remainders, prompt lengths), compiled greedy
    text over four shapes, each met twice, gives the eager tokens, and a shape met again gets its
    cache back at the same addresses (torch.compile's graph trees then replay, not record)."""
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS]
    long = [gpu_model.encode_prompt(" ".join(PROMPTS) * 8)]  # past the first 256-slot bucket
    opts = dict(max_new_tokens=20, logit_bias={gpu_model.tokenizer.eos_id: -1e9})
    addresses, reusable = {}, generate_module._reusable_cache

    def recorded(transformer, n_rows, total):  # the cache each compiled call runs on
        cache = reusable(transformer, n_rows, total)
        addresses.setdefault((n_rows, total), set()).add((cache.valid.data_ptr(), cache.k[0].data_ptr()))
        return cache

    monkeypatch.setattr(generate_module, "_reusable_cache", recorded)
    skips = counters["inductor"]["cudagraph_skips"]
    for batch in [prompts, prompts[:1], long, prompts[:2]] * 2:  # the first has the largest cache: no growth
        assert generate(gpu_model, batch, GenerationOptions(compile=True, **opts)) == generate(gpu_model, batch, GenerationOptions(compile=False, **opts))
    assert len(addresses) == 4 and all(len(seen) == 1 for seen in addresses.values())
    assert counters["inductor"]["cudagraph_skips"] == skips


@pytest.mark.parametrize("mode", ["image", "interleaved"])
def test_sampled_guided_generation_on_gpu(gpu_model, mode):
    """Sampling with 3-way guidance through the CUDA-graph step: well-formed images and seeded (the
    same output twice). Not asserted: each row as if alone in its batch. On a GPU the kernels
    differ with the batch shape, and over 1,024 sampled codes a last-bit change of the logits
    flipped a draw once in ~5 runs on an H200 (README: batch independence holds as far as the
    logits do)."""
    tok, n = gpu_model.tokenizer, gpu_model.image_seq_len
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS[:2]]
    opts = GenerationOptions(mode=mode, max_new_tokens=n + 20, temperature=0.8, seed=3, logit_bias={tok.boi_id: 3.0}, compile=True)
    code_ids = set(tok.code_to_id.tolist())
    batched = generate(gpu_model, prompts, opts)
    assert batched == generate(gpu_model, prompts, opts)
    for out in batched + [generate(gpu_model, [p], opts)[0] for p in prompts]:
        if mode == "image":
            assert out[0] == tok.boi_id and out[-1] == tok.eoi_id and len(out) == n + 2
        if tok.boi_id in out:
            start = out.index(tok.boi_id)
            codes = out[start + 1 : start + 1 + n]
            assert set(codes) <= code_ids and out[start + 1 + n] == tok.eoi_id
            assert any(not isinstance(seg, str) for seg in gpu_model.decode_output(out))  # VQGAN-decoded on the GPU


def test_text_loop_on_gpu_stop_strings_and_sampling(gpu_model):
    """The device text loop on a GPU looks at the host every 16 steps: greedy rows with stop
    strings still end after the token that completed one (checked against the rule applied to the
    free output); sampled rows with a repetition penalty are seeded and independent of their batch."""
    tok = gpu_model.tokenizer
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS]
    free = generate(gpu_model, prompts, GenerationOptions(max_new_tokens=40, compile=True))
    stops = (tok.decode_text(free[0][2:4]), tok.decode_text(free[2][30:32]))
    assert generate(gpu_model, prompts, GenerationOptions(max_new_tokens=40, stop_strings=stops, compile=True)) == cut_at_stop_strings(tok.decode_text, free, stops)
    opts = GenerationOptions(max_new_tokens=30, temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=7, stop_strings=stops[:1], compile=True)
    batched = generate(gpu_model, prompts, opts)
    assert batched == generate(gpu_model, prompts, opts) == [generate(gpu_model, [p], opts)[0] for p in prompts]


def test_open_image_continued_through_cuda_graphs(gpu_model):
    """A prompt ending inside an image, its given codes prefilled: greedy guided codes through the
    CUDA-graph step finish the image a free run drew, beside a row given none."""
    n = gpu_model.image_seq_len
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS[:2]]
    opts = GenerationOptions(mode="image", image_temperature=0.0, compile=True)
    free = generate(gpu_model, prompts, opts)
    given = [prompts[0], prompts[1] + free[1][: n // 2 + 1]]
    assert generate(gpu_model, given, opts) == free


@pytest.mark.parametrize("graph_steps", [1, 16])
def test_greedy_steps_replayed_from_captured_graphs(gpu_model, graph_steps):
    """`graph_steps`: greedy text replayed from CUDA graphs captured by the generator (N steps a
    replay, the budget's remainder one step a replay) gives the eager tokens: rows stopped by a
    stop id and by a stop string, another batch size between calls (new cache, graphs captured
    anew), and repeated calls, which replay the graphs already captured."""
    tok = gpu_model.tokenizer
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS]
    base = dict(max_new_tokens=45, logit_bias={tok.eos_id: -1e9})
    free = generate(gpu_model, prompts, GenerationOptions(compile=False, **base))
    stops = dict(stop_ids=(free[1][20],), stop_strings=(tok.decode_text(free[0][2:4]),))
    for opts in (base, dict(**base, **stops)):
        eager = generate(gpu_model, prompts, GenerationOptions(compile=False, **opts))
        graphed = GenerationOptions(compile=True, graph_steps=graph_steps, **opts)
        assert generate(gpu_model, prompts[:1], graphed) == generate(gpu_model, prompts[:1], GenerationOptions(compile=False, **opts))
        assert generate(gpu_model, prompts, graphed) == eager
        captured = dict(_graphs_of(gpu_model, len(prompts)).graphs)
        assert generate(gpu_model, prompts, graphed) == eager
        assert _graphs_of(gpu_model, len(prompts)).graphs == captured  # the same graph objects, replayed
        if "stop_ids" not in opts:  # 44 steps: the first call's uncaptured, then calls of N, then of 1
            assert set(captured) == {1, graph_steps}
    assert eager != free


@pytest.mark.parametrize("graph_steps", [None, 16])
def test_fused_triton_kernels_on_gpu(gpu_model, graph_steps):
    """kernels="triton" (compiled kernels, replayed from captured graphs; the tiny model's work is
    below TUNED_FROM, so its blocks are SMALL_CONFIG's, untimed: the timed choice and attention in
    parts are checked below): the eager tokens at batch 1, with a stop id and a stop string too,
    on every call, the graphs captured once; a batch of 3 falls back to the usual step."""
    tok = gpu_model.tokenizer
    prompts = [gpu_model.encode_prompt(p) for p in PROMPTS]
    base = dict(max_new_tokens=45, logit_bias={tok.eos_id: -1e9})
    free = generate(gpu_model, prompts[:1], GenerationOptions(compile=False, **base))
    for opts in (base, dict(**base, stop_ids=(free[0][30],), stop_strings=(tok.decode_text(free[0][10:12]),))):
        eager = generate(gpu_model, prompts[:1], GenerationOptions(compile=False, **opts))
        fused = GenerationOptions(kernels="triton", graph_steps=graph_steps, **opts)
        assert generate(gpu_model, prompts[:1], fused) == eager
        graphs = next(g for (rows, *_, kind), g in gpu_model.transformer._greedy_graphs.items() if rows == 1 and kind == "triton")
        captured = dict(graphs.graphs)
        assert generate(gpu_model, prompts[:1], fused) == eager
        assert graphs.graphs == captured and captured  # replayed, not captured again
    with pytest.warns(UserWarning, match="batch 1 only"):
        assert generate(gpu_model, prompts, GenerationOptions(kernels="triton", **base)) == generate(gpu_model, prompts, GenerationOptions(compile=False, **base))


def test_fused_triton_step_in_bf16_on_gpu(tiny_hf):
    """In bf16 on a GPU (which rounds to nearest, unlike Triton's interpreter) the fused step's
    logits are as close to the float32 ones as the reference forward's."""
    from chameleon import kernels

    def step(model, fused):
        t = model.transformer
        cache = t.new_cache(1, 256)
        ids = torch.tensor([model.encode_prompt(PROMPTS[2])], device="cuda")
        n = ids.shape[1]
        cache.valid[:, : n + 1] = True
        token, position, slot = torch.tensor([[77]], device="cuda"), torch.tensor([[n]], device="cuda"), torch.tensor([n], device="cuda")
        with torch.no_grad():
            t(ids, cache=cache, input_pos=0, kv_len=n)
            if fused:
                return kernels.FusedDecoder(t).step_logits(token, position, slot, cache).clone()
            return t(token, cache=cache, input_pos=n, positions=position, kv_len=n + 1)[:, -1]

    truth = step(chameleon.load(tiny_hf, device="cuda", dtype=torch.float32), fused=False)
    bf16 = chameleon.load(tiny_hf, device="cuda", dtype=torch.bfloat16)
    got, expected = step(bf16, fused=True), step(bf16, fused=False)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert (got - truth).abs().mean() <= 1.25 * (expected - truth).abs().mean()


def test_fused_gemv_tuned_on_gpu(monkeypatch):
    """The block choice timed on a GPU (triton's do_bench over every candidate, cuBLAS among
    them; the tiny models' matrices are below the size that is timed, so forced here): the chosen
    configuration is recorded, and gives the exact product."""
    from chameleon import kernels

    monkeypatch.setattr(kernels, "TUNED_FROM", 0)
    g = torch.Generator(device="cuda").manual_seed(0)
    w, x = torch.randn(384, 512, device="cuda", generator=g), torch.randn(512, device="cuda", generator=g)
    res = torch.randn(384, device="cuda", generator=g)
    out = kernels.gemv(w, x, torch.empty(384, device="cuda"), residual=res)
    torch.testing.assert_close(out, res + torch.mv(w, x), rtol=1e-4, atol=1e-4)
    (config,) = [c for key, c in kernels.chosen_configs().items() if key.startswith("gemv residual 384 512 ")]
    assert config in kernels.GEMV_CONFIGS


def _attention_step_against_reference(model, slot: int, invalid: list[int], size: int, configs, monkeypatch):
    """One decode step at `slot` of a `size`-slot cache (the slots `invalid` unseen) on the fused
    kernels with each attention configuration in `configs` forced, against the reference forward:
    logits, the new cache entries, nothing written past the slot. Returns how many times the
    combine kernel ran (the configurations in parts) and the decoder and cache of the last step."""
    from chameleon import kernels

    t, device = model.transformer, model.transformer.output.weight.device

    def prefilled():
        cache = t.new_cache(1, size)
        cache.valid[:, :slot] = True
        cache.valid[:, invalid] = False
        if slot:
            tokens = torch.randint(10, 4000, (1, slot), generator=torch.Generator().manual_seed(0)).to(device)
            t(tokens, cache=cache, input_pos=0, kv_len=slot)
        cache.valid[:, slot] = True
        return cache

    token, position = torch.tensor([[77]], device=device), torch.tensor([[slot - len(invalid)]], device=device)
    with torch.no_grad():
        expected_cache = prefilled()
        expected = t(token, cache=expected_cache, input_pos=slot, positions=position, kv_len=slot + 1)[:, -1]
        cache = prefilled()
    combines, real_combine, real_tuned = [], kernels._combine_kernel, kernels._tuned

    class Counted:  # the combine kernel, its launches counted
        def __getitem__(self, grid):
            combines.append(grid)
            return real_combine[grid]

    monkeypatch.setattr(kernels, "_combine_kernel", Counted())
    for config in configs:
        monkeypatch.setattr(kernels, "_tuned", lambda key, launch, candidates, size, config=config:
                            config if key[0] == "attention" else real_tuned(key, launch, candidates, size))
        decoder = kernels.FusedDecoder(t)
        with torch.no_grad():  # (the step reads the new slot from registers, never from the cache: steps may repeat)
            got = decoder.step_logits(token, position, torch.tensor([slot], device=device), cache).clone()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=lambda m, c=config: f"{c}: {m}")
        for mine, theirs in zip(cache.k + cache.v, expected_cache.k + expected_cache.v):
            torch.testing.assert_close(mine[:, :, slot], theirs[:, :, slot], rtol=1e-4, atol=1e-4)
            assert not mine[:, :, slot + 1 :].any()
    monkeypatch.setattr(kernels, "_combine_kernel", real_combine)
    monkeypatch.setattr(kernels, "_tuned", real_tuned)
    return len(combines), decoder, cache


@pytest.mark.parametrize("slot, invalid", [(0, []), (700, [3, *range(64, 128)]), (999, [500])],
                         ids=["first slot", "a part with no valid slot", "last slot"])
def test_fused_attention_in_parts_on_gpu(gpu_model, slot, invalid, monkeypatch):
    """Every attention candidate compiled, on a 1,000-slot cache: the tiny model's attention is
    below TUNED_FROM, so generation on it runs SMALL_CONFIG's single pass only, and the 7B timing
    compares no logits (bf16 tokens on random weights differ anyway). Parts of 64, 128 and 256
    slots (the last cut short), parts after the new slot (empty), one whose slots are all invalid,
    and MAX_PARTS making parts longer; each step's logits and cache entries are the reference's.
    Then the attention's own timed choice (TUNED_FROM 0) gives the same output."""
    from chameleon import kernels

    configs = kernels.ATTENTION_CONFIGS
    combines, _, _ = _attention_step_against_reference(gpu_model, slot, invalid, 1000, configs, monkeypatch)
    assert combines == 2 * sum(c[2] is not None for c in configs)  # every split configuration ran in parts (2 layers)
    monkeypatch.setattr(kernels, "MAX_PARTS", 3)  # 1,000 slots: parts of 334 slots and more, rounded to whole blocks
    combines, decoder, cache = _attention_step_against_reference(gpu_model, slot, invalid, 1000, configs, monkeypatch)
    assert combines == 2 * sum(c[2] is not None for c in configs)
    # The timed choice among all candidates (last layer's inputs, left in the decoder's buffers)
    monkeypatch.setattr(kernels, "TUNED_FROM", 0)
    t, args = gpu_model.transformer, gpu_model.transformer.args
    device = decoder.attn.device
    out = torch.empty_like(decoder.attn)
    positions, slot_t = torch.tensor([[slot - len(invalid)]], device=device), torch.tensor([slot], device=device)
    kernels.decode_attention(decoder.qkv.view(1, -1), decoder.weights[-1][2], t.rope_freqs(device), positions, slot_t, cache.k[-1], cache.v[-1],
                             cache.valid, out.view(1, -1), args)
    torch.testing.assert_close(out, decoder.attn, rtol=1e-5, atol=1e-5)
    assert [c for key, c in kernels.chosen_configs().items() if key.startswith(f"attention {args.n_heads} {args.kv_heads} {args.head_dim} 1000 ")]


def test_fused_output_gemv_skipping_rows_on_gpu():
    """The output GEMV leaving a range of rows out (text steps skip the image codes' logits), as
    cuBLAS computes it (the candidate the timing may choose) and as the Triton kernel does (even
    and masked blocks): the other rows are the product, the skipped ones untouched."""
    from chameleon import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((4096, 512), (4000, 520)):
        w, x = torch.randn(n, k, device="cuda", generator=g), torch.randn(k, device="cuda", generator=g)
        gain = torch.rand(k, device="cuda", generator=g) + 0.5
        expected = torch.mv(w, torch.nn.functional.rms_norm(x, (k,), eps=1e-5) * gain)
        for skip in ((0, 1000), (1000, 3000), (3000, n)):
            for config in (kernels.CUBLAS, kernels.GEMV_CONFIGS[0], kernels.SMALL_CONFIG["gemv"]):
                out = torch.full((n,), 7.0, device="cuda")
                kernels.gemv(w, x, out, norm=gain, eps=1e-5, skip=skip, config=config)
                keep = torch.ones(n, dtype=torch.bool, device="cuda")
                keep[skip[0] : skip[1]] = False
                assert out[~keep].eq(7.0).all(), (config, skip)
                torch.testing.assert_close(out[keep], expected[keep], rtol=1e-4, atol=1e-4, msg=lambda m, c=config, s=skip: f"{c} {s}: {m}")
