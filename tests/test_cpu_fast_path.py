"""The CPU inference layout (fused q/k/v, w1/w3 and q/k-norms; input-major and oneDNN-packed weights;
logits computed per vocabulary span) changes speed only: same values, same state dict, and
autograd and weight updates still reach the parameters."""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

import chameleon
from chameleon.errors import InputError
from chameleon.generate import GenerationOptions, generate
from chameleon.model import apply_rope, inference_norm_weight, linear, rms_norm, rms_norm_inference


@pytest.fixture()
def pair(tiny_hf):
    """(plain, optimized): the same tiny checkpoint, one without the CPU layout."""
    optimized = chameleon.load(tiny_hf)
    plain = copy.deepcopy(optimized)  # deep copies own their storage: the fused tensors go stale
    plain.transformer.vocab_spans = [(0, plain.config.vocab_size)]
    for block in plain.transformer.layers:
        block.attention.fused = block.feed_forward.fused = None
    return plain, optimized


def tokens(model, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, model.tokenizer.vocab_size, (2, n), generator=g)


def test_same_logits_and_state_dict(pair):
    plain, optimized = pair
    x = tokens(plain)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), plain(x), atol=1e-5, rtol=1e-5)
    a, b = plain.transformer.state_dict(), optimized.transformer.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert optimized.transformer.layers[0].attention.fused[0].current()


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_optimized_model_saves_and_reloads(pair, tmp_path, fmt):
    _, optimized = pair
    optimized.save(tmp_path / fmt, format=fmt)
    again = chameleon.load(tmp_path / fmt)
    assert again.fingerprint == optimized.fingerprint
    x = tokens(optimized)
    with torch.no_grad():
        assert torch.equal(again(x), optimized(x))
    # Another save into the now non-empty directory (or onto a file) is refused, nothing touched.
    before = {f: f.read_bytes() for f in (tmp_path / fmt).rglob("*") if f.is_file()}
    with pytest.raises(InputError, match=f"{fmt}: exists and is not empty; save into a new directory"):
        optimized.save(tmp_path / fmt, format=fmt)
    assert {f: f.read_bytes() for f in (tmp_path / fmt).rglob("*") if f.is_file()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file: exists and is not a directory"):
        optimized.save(tmp_path / "file", format=fmt)


def test_weight_updates_reach_the_fused_tensors(pair, tiny_hf):
    plain, optimized = pair
    x = tokens(plain)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in plain.transformer.state_dict().items()}
    plain.transformer.load_state_dict(state)
    optimized.transformer.load_state_dict(state)  # in place: copy_ into the views
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), plain(x), atol=1e-5, rtol=1e-5)
        # A replaced parameter makes the fused tensor stale: the separate weights are used again.
        optimized.transformer.load_state_dict(plain.transformer.state_dict(), assign=True)
        assert not optimized.transformer.layers[0].attention.fused[0].current()
        with pytest.warns(UserWarning, match="a parameter was replaced"):
            torch.testing.assert_close(optimized(x), plain(x), atol=1e-5, rtol=1e-5)


def test_compiled_step_follows_replaced_weights(pair):
    """A compiled graph cannot check staleness itself (generate checks before running it): after a
    parameter is replaced, compiled decoding must use the new weights, as eager decoding does."""
    plain, optimized = pair
    prompts = tokens(plain, n=6).tolist()
    eager, compiled = GenerationOptions(max_new_tokens=8), GenerationOptions(max_new_tokens=8, compile=True)
    assert generate(optimized, prompts, compiled) == generate(plain, prompts, eager)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in plain.transformer.state_dict().items()}
    plain.transformer.load_state_dict(state)
    optimized.transformer.load_state_dict(state, assign=True)
    with pytest.warns(UserWarning, match="a parameter was replaced"):
        assert generate(optimized, prompts, compiled) == generate(plain, prompts, eager)


def test_autograd_reaches_the_parameters(pair):
    _, optimized = pair
    optimized.train()
    loss = optimized(tokens(optimized)).logsumexp(-1).mean()
    loss.backward()
    attn, ffn = optimized.transformer.layers[0].attention, optimized.transformer.layers[0].feed_forward
    for p in (attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.q_norm.weight, ffn.w1.weight, ffn.w3.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_vocab_spans_compute_only_what_is_asked(pair):
    plain, optimized = pair
    tr = optimized.transformer
    assert len(tr.vocab_spans) >= 3  # below the image codes, the codes, above them
    image_span = next(i for i, (a, b) in enumerate(tr.vocab_spans) if a == int(optimized.tokenizer.code_to_id.min()))
    h = torch.randn(2, 1, optimized.config.dim)
    with torch.no_grad():
        full = plain.transformer.head(h)
        part = tr.head(h, (image_span,))
    a, b = tr.vocab_spans[image_span]
    torch.testing.assert_close(part[..., a:b], full[..., a:b], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(part[..., :a]).all() and torch.isneginf(part[..., b:]).all()


@pytest.mark.parametrize("mode", ["text", "image", "interleaved"])
def test_generation_unchanged(pair, mode):
    plain, optimized = pair
    prompts = [optimized.encode_prompt("Natalia sold clips to 48 of her friends"), optimized.encode_prompt("Weng earns")]
    # Greedy: the two layouts' logits may differ in the last bits (BLAS picks kernels by shape and CPU;
    # on an AMD EPYC 2.4e-7), and over a random tiny model's near-uniform distributions a sampled draw
    # flips on such a difference (there: 3 of 16 guided image rows over 8 seeds), an argmax does not.
    opts = GenerationOptions(mode=mode, max_new_tokens=300 if mode == "interleaved" else 24, temperature=0.0, image_temperature=0.0, seed=3)
    if mode == "interleaved":
        opts.logit_bias = {optimized.tokenizer.boi_id: 8.0}
    assert generate(optimized, prompts, opts) == generate(plain, prompts, opts)


def sampled_options(model, case: str, seed: int) -> GenerationOptions:
    """Sampling whose draws a last-bit logit difference cannot plausibly flip (see the test below)."""
    text = dict(temperature=0.9, top_k=40, repetition_penalty=1.3)
    if case == "text":
        return GenerationOptions(max_new_tokens=24, seed=seed, **text)
    if case == "text, top-p":  # 8 text tokens with logits 10..17 (the rest near 0): their order is fixed
        ladder = (~model.tokenizer.non_text_ids).nonzero().squeeze(-1)[100:108].tolist()
        return GenerationOptions(max_new_tokens=24, seed=seed, temperature=0.9, top_p=0.8, repetition_penalty=1.3,
                                 logit_bias={t: 10.0 + i for i, t in enumerate(ladder)})
    if case == "image":
        return GenerationOptions(mode="image", seed=seed, image_top_p=1.0)
    return GenerationOptions(mode="interleaved", max_new_tokens=300, seed=seed, image_top_p=1.0,
                             logit_bias={model.tokenizer.boi_id: 8.0}, **text)


@pytest.mark.parametrize("case", ["text", "text, top-p", "image", "interleaved"])
def test_sampled_generation_unchanged(pair, case):
    """The two layouts' logits may differ in the last bits (above); top-p is what turns that into
    another token. It ranks tokens by probability and inverts the running sum in that order, and a
    random tiny model's distributions are near-uniform: some two tokens are nearly tied, swap places
    on such a difference, and a draw landing on either picks the other (image_top_p=0.9: 5 of 100
    guided image rows over 50 seeds differed on an AMD EPYC). In token-id order (top_p=1) a draw
    changes only if it lands within ~1e-8 of an edge. So image codes are drawn from all codes (every
    one reachable: the logits' support is compared too), text with temperature, top-k and the
    penalty, and top-p over tokens a logit bias sets a whole unit apart. There, over 50 seeds: 0 of
    100 rows differed per case (interleaved: 1 in one of three runs); with the logits moved ~50x
    more, at most 3 (interleaved)."""
    plain, optimized = pair
    prompts = [optimized.encode_prompt("Natalia sold clips to 48 of her friends"), optimized.encode_prompt("Weng earns")]
    opts = sampled_options(optimized, case, seed=3)
    out = generate(optimized, prompts, opts)
    assert out == generate(plain, prompts, opts)
    assert out != generate(optimized, prompts, dataclasses.replace(opts, temperature=0.0, image_temperature=0.0))  # not argmax


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_packed_bf16_linear_tracks_the_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g).bfloat16()
    x = torch.randn(1, 3, 128, generator=g).bfloat16()
    cache: dict = {}
    with torch.no_grad():
        small = w[:8]  # too small to pay for a oneDNN call: plain F.linear
        assert torch.equal(linear(x, small, cache, "small"), F.linear(x, small)) and not cache
        torch.testing.assert_close(linear(x, w, cache, "w").float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
        assert "w" in cache
        w.mul_(-1)  # in place: the version counter moves, the packed copy is rebuilt
        torch.testing.assert_close(linear(x, w, cache, "w").float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
        # A replacement allocated after the old weight is dropped must not land at its address (same
        # pointer, shape and version would pass for the old weight): the cache keeps the old one alive.
        old = weakref.ref(w)
        del w, small
        assert old() is not None
        w = torch.randn(256, 128, generator=g).bfloat16()
        torch.testing.assert_close(linear(x, w, cache, "w").float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_bf16_optimized_model_matches_plain_bf16(tiny_hf):
    optimized = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    plain = copy.deepcopy(optimized)
    for block in plain.transformer.layers:
        block.attention.fused = block.feed_forward.fused = None
    unpacked = chameleon.load(tiny_hf, dtype=torch.bfloat16, pack_bf16=False)
    x = tokens(plain)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), plain(x), atol=0.05, rtol=0.05)
        torch.testing.assert_close(unpacked(x), plain(x), atol=0.05, rtol=0.05)
    assert optimized.transformer.packed and unpacked.transformer.packed is None


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_packing_stops_where_memory_runs_short(tiny_hf, monkeypatch):
    """Packed copies double the weights' memory: with too little left, matrices stay unpacked
    (a warning says so), with the packed model's logits."""
    import chameleon.model as model_module

    packed = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    short = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    x = tokens(packed)
    asked = []
    monkeypatch.setattr(model_module, "_available_memory", lambda: asked.append(1) or model_module.PACKING_HEADROOM + 1000)
    with torch.no_grad(), pytest.warns(UserWarning, match="bf16 weights that are not packed yet stay unpacked"):
        got = short(x)
    refusals = len(asked)
    with torch.no_grad():
        short(x)
    assert len(asked) == refusals  # a refusal is remembered until the weight changes
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(got, packed(x), atol=0.05, rtol=0.05)
    assert short.transformer.packed and all(copy is None for _, copy, _ in short.transformer.packed.values())
    assert all(copy is not None for _, copy, _ in packed.transformer.packed.values())


def test_cgroup_headroom_counts_limits_up_the_hierarchy(tmp_path):
    """A container's limit may sit on the process's cgroup or an ancestor; reclaimable page cache
    (a checkpoint just read) does not count as used."""
    from chameleon.model import _cgroup_headroom

    def group(path, limit, usage, cache):
        d = tmp_path / path
        d.mkdir(parents=True)
        (d / "memory.max").write_text(f"{limit}\n")
        (d / "memory.current").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 1\ninactive_file {cache}\n")

    group("job", 10_000, 6_000, 1_000)  # 10,000 - (6,000 - 1,000)
    group("job/step", "max", 6_000, 1_000)
    assert _cgroup_headroom(str(tmp_path), "memory.max", "memory.current", "inactive_file", "/job/step") == [5_000]
    (tmp_path / "job/memory.max").write_text(str(1 << 62))  # how cgroup v1 writes "no limit"
    assert _cgroup_headroom(str(tmp_path), "memory.max", "memory.current", "inactive_file", "/job/step") == []


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_dtype_changes_drop_the_packed_copies(tiny_hf):
    """Moving or converting the model replaces its weights: the packed copies (each holding the
    tensor it was made from) are dropped, and made again once the CPU layout is restored."""
    model = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    x = tokens(model)
    with torch.no_grad():
        before = model(x)
        assert model.transformer.packed
        model.to(torch.float32)
        assert model.transformer.packed == {}
        model.to(torch.bfloat16)
        model.transformer.optimize_for_cpu_()  # as the stale-weights warning says
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    assert model.transformer.packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rope_is_bit_identical_to_the_real_form(dtype):
    """Eager CPU rotates with one complex product; graphs and GPUs with real arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 64, generator=g).to(dtype)
    freqs = torch.randn(2, 5, 32, 2, generator=g)
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[:, :, None, :, 0], freqs[:, :, None, :, 1]
    real_form = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).type_as(x)
    assert torch.equal(apply_rope(x, freqs), real_form)
    wide = torch.randn(2, 5, 6, 128, generator=g).to(dtype)[..., :64]  # a non-contiguous slice
    assert torch.equal(apply_rope(wide, freqs), apply_rope(wide.contiguous(), freqs))


def test_cpu_rms_norm_is_the_rms_norm_rounded_once():
    """The layer norm of [x, -x] with the weight inside: within one bf16 rounding of `rms_norm`,
    and no farther from exact arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4000, 256, generator=g) * torch.rand(4000, 1, generator=g) * 5).bfloat16()
    weight = (1 + 0.1 * torch.randn(256, generator=g)).bfloat16()
    with torch.no_grad():
        fast = rms_norm_inference(x, inference_norm_weight(weight), 1e-5)
        plain = rms_norm(x, weight, 1e-5)
        torch.testing.assert_close(fast, plain, atol=0, rtol=2**-7)  # one bf16 unit
        exact = weight.float() * x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        assert (fast.float() - exact).abs().mean() <= (plain.float() - exact).abs().mean()
        torch.testing.assert_close(rms_norm_inference(x.float(), inference_norm_weight(weight.float()), 1e-5),
                                   rms_norm(x.float(), weight.float(), 1e-5), atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_bf16_fast_path_is_no_less_precise(tiny_hf):
    """The CPU inference path rounds less often than the modules (the norm weight applied inside
    the norm kernel): its bf16 logits are at least as close to the fp32 ones."""
    reference = chameleon.load(tiny_hf)
    fast = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    plain = copy.deepcopy(fast)
    for block in plain.transformer.layers:
        block.attention.fused = block.feed_forward.fused = None
    x = tokens(reference, n=32)
    with torch.no_grad():
        exact = reference(x)
        errors = [(m(x) - exact).abs().mean().item() for m in (fast, plain)]
    assert errors[0] <= errors[1] * 1.05, errors


def test_dropout_in_training_mode_uses_the_modules(tiny_hf):
    model = chameleon.load(tiny_hf)
    assert model.transformer.inference_weights() is None  # autograd on
    with torch.no_grad():
        assert model.transformer.inference_weights() is not None
        model.transformer.args.dropout = 0.1
        model.train()
        assert model.transformer.inference_weights() is None


def test_decode_step_mask_equals_the_general_mask(tiny_model):
    """An eager one-token step builds its mask from the valid slots plus its own; reading the
    whole cache takes the general causal mask. Left padding and a row whose own slot is invalid
    (guidance rows skip text tokens) give the same logits both ways."""
    tr = tiny_model.transformer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tiny_model.tokenizer.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        cache = tr.new_cache(2, 16)
        cache.valid[0, :8] = True
        cache.valid[1, 3:8] = True  # row 1 left-padded by 3
        positions = (torch.arange(8)[None] - torch.tensor([[0], [3]])).clamp(min=0)
        tr(ids[:, :8], cache=cache, input_pos=0, positions=positions, kv_len=8)
        cache.valid[:, 8] = torch.tensor([True, False])  # row 1 does not see its new token
        step = dict(cache=cache, input_pos=8, positions=torch.tensor([[8], [5]]))
        fast = tr(ids[:, 8:], kv_len=9, **step)
        general = tr(ids[:, 8:], kv_len=None, **step)
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-5)


def test_weights_argument_refuses_autograd(tiny_model):
    tr = tiny_model.transformer
    with torch.no_grad():
        weights = tr.inference_weights()
    with pytest.raises(ValueError, match="inference only"):
        tr(torch.tensor([[1, 5, 6]]), weights=weights)


def test_replaced_parameters_warn_once_when_packing_is_lost(tiny_hf):
    """Also: the blocks' packed copies of the replaced weights (each holding its source) are
    dropped, every time replaced weights are found, not only the first."""
    model = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    x = tokens(model)
    for round in range(2):
        with torch.no_grad():
            model(x)
        assert any(k[0] != "output" for k in model.transformer.packed)
        model.transformer.load_state_dict({k: v.clone() for k, v in model.transformer.state_dict().items()}, assign=True)
        with torch.no_grad(), pytest.warns(UserWarning, match="optimize_for_cpu_"):  # again after optimize_for_cpu_
            model(x)
        assert {k[0] for k in model.transformer.packed} <= {"output"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x)  # once per model
        model.transformer.optimize_for_cpu_()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_packed_weights_on_huge_pages_keep_their_values():
    """Packing collapses the packed copies onto 2 MB pages where the kernel allows: same products."""
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(4096, 512, generator=g).bfloat16(), torch.randn(256, 128, generator=g).bfloat16()
    cache: dict = {}
    with torch.no_grad():
        for w in (big, small):
            x = torch.randn(1, 1, w.shape[1], generator=g).bfloat16()
            plain = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
            assert torch.equal(linear(x, w, cache, id(w)), plain)


def test_to_another_dtype_warns_and_fuses_again_on_request(tiny_hf):
    """.to() replaces the parameters: the fused tensors go stale, inference falls back to the
    separate modules (same values) and says how to fuse again."""
    moved = chameleon.load(tiny_hf).to(torch.bfloat16)
    direct = chameleon.load(tiny_hf, dtype=torch.bfloat16)
    x = tokens(direct)
    with torch.no_grad():
        expected = direct(x)
        with pytest.warns(UserWarning, match=r"call model.transformer.optimize_for_cpu_\(\) to fuse them again"):
            torch.testing.assert_close(moved(x), expected, atol=2e-2, rtol=2e-2)
        moved.transformer.optimize_for_cpu_()
        assert moved.transformer.inference_weights() is not None
        torch.testing.assert_close(moved(x), expected, atol=0, rtol=0)
