"""The fused Triton decode kernels (chameleon/kernels.py) against the reference forward. Without a
GPU they run in Triton's interpreter, so these tests check the kernels' arithmetic on any machine;
tests/test_cuda.py runs them compiled on a GPU."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import emulate_cuda_graphs
from chameleon.config import preset
from chameleon.generate import GenerationOptions, generate
from chameleon.tiny import TINY_VQ, random_model

# CI installs triton (the test extra): there, a missing one fails. (Not imported here: chameleon.kernels
# must import it first, to run it in the interpreter without a GPU.)
if os.environ.get("CI") != "true" and importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
from chameleon import kernels  # noqa: E402  (after the check above)

# The tests that run the kernels on CPU tensors need the interpreter, which conftest chooses only
# without a GPU; on a GPU machine tests/test_cuda.py runs them compiled instead.
on_cpu = pytest.mark.skipif(not kernels.INTERPRETED, reason="runs the kernels on CPU tensors in Triton's interpreter (chosen by conftest without a GPU)")


def _model(dtype=torch.float32, **shape):
    args = dataclasses.replace(preset("tiny"), model_parallel_size=2, **shape)
    model = random_model(args, TINY_VQ, seed=1).to(dtype)
    model.transformer.fuse_()
    return model


def _prefilled(transformer, length: int, invalid: list[int], size: int = 160):
    """A batch-1 cache with `length` prompt tokens written, the slots `invalid` left unseen."""
    cache = transformer.new_cache(1, size)
    cache.valid[:, :length] = True
    cache.valid[:, invalid] = False
    tokens = torch.randint(10, 4000, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        transformer(tokens, cache=cache, input_pos=0, kv_len=length)
    return cache


def _step(model, slot: int, invalid: list[int], fused: bool):
    """Logits of one decode step at `slot` (earlier slots `invalid` unseen) and the cache after."""
    t = model.transformer
    cache = _prefilled(t, slot, invalid)
    cache.valid[:, slot] = True
    token, position = torch.tensor([[77]]), torch.tensor([[slot - len(invalid)]])
    with torch.no_grad():
        if fused:
            return kernels.FusedDecoder(t).step_logits(token, position, torch.tensor([slot]), cache), cache
        return t(token, cache=cache, input_pos=slot, positions=position, kv_len=slot + 1)[:, -1], cache


@on_cpu
@pytest.mark.parametrize("attention", [(64, 4, None), (16, 4, 32), (16, 4, 16)], ids=["one part", "5 parts", "10 parts, 1 empty"])
@pytest.mark.parametrize("shape", [{}, {"n_kv_heads": None, "qk_normalization": False}], ids=["gqa", "mha-no-qk-norm"])
def test_fused_step_matches_reference(shape, attention, monkeypatch):
    """One float32 decode step at slot 130 of a 160-slot cache (attention over several blocks, a
    few earlier slots invalid; in one part per kv head, or in parts of 32 or 16 slots merged by
    the combine kernel, the last part beyond the new slot): the model's own logits and new cache
    entries, and nothing else written. GQA puts 2 query heads on each kv head."""
    monkeypatch.setitem(kernels.INTERPRETED_CONFIG, "attention", attention)
    model = _model(**shape)
    slot = 130
    got, cache = _step(model, slot, [3, 64, 100], fused=True)
    expected, expected_cache = _step(model, slot, [3, 64, 100], fused=False)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for mine, theirs in zip(cache.k + cache.v, expected_cache.k + expected_cache.v):
        torch.testing.assert_close(mine[:, :, slot], theirs[:, :, slot], rtol=0, atol=1e-5)
        assert torch.equal(mine[:, :, :slot], theirs[:, :, :slot]) and not mine[:, :, slot + 1 :].any()


@on_cpu
def test_fused_step_in_bf16_as_precise_as_the_reference():
    """In bf16 the kernels round where the reference rounds but sum in another order, so the two
    differ by a few units in the last place; against the float32 logits, their error is no larger.
    (Triton's interpreter truncates float32 to bf16 where a GPU rounds to nearest: that doubles
    the rounding error, measured 2.0x here, so without a GPU the bound is looser.)"""
    model = _model()
    truth, _ = _step(model, 130, [3], fused=False)
    model.to(torch.bfloat16).transformer.fuse_()
    got, _ = _step(model, 130, [3], fused=True)
    expected, _ = _step(model, 130, [3], fused=False)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    bound = 2.5 if kernels.INTERPRETED else 1.25
    assert (got - truth).abs().mean() <= bound * (expected - truth).abs().mean()


@on_cpu
@pytest.mark.parametrize("norm, residual, swiglu", [(True, False, False), (False, True, False), (True, False, True), (False, False, False)])
def test_gemv_on_shapes_blocks_do_not_divide(norm, residual, swiglu):
    """Rows and columns that are not multiples of the blocks (the masked path), for every epilogue;
    and a weight stored input-major, as optimize_for_cpu_() lays them out."""
    g = torch.Generator().manual_seed(0)
    n, k = 100, 72
    w = torch.randn(2 * n if swiglu else n, k, generator=g)
    x, gain, res = torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5, torch.randn(n, generator=g)
    h = torch.nn.functional.rms_norm(x, (k,), eps=1e-5) * gain if norm else x
    expected = w @ h
    if swiglu:
        gate, up = expected.chunk(2)
        expected = torch.nn.functional.silu(gate) * up
    if residual:
        expected = expected + res
    for layout in (w, w.t().contiguous().t()):
        if not (residual or swiglu):  # rows left out: the others computed, these untouched
            for config in (None, kernels.CUBLAS):
                out = torch.full((n,), 7.0)
                kernels.gemv(layout, x, out, norm=gain if norm else None, eps=1e-5, skip=(30, 90), config=config)
                torch.testing.assert_close(out[30:90], torch.full((60,), 7.0))
                torch.testing.assert_close(torch.cat([out[:30], out[90:]]), torch.cat([expected[:30], expected[90:]]), rtol=1e-5, atol=1e-5)
        for config in (None, kernels.CUBLAS):  # the tuned Triton kernel, and the torch (cuBLAS) candidate
            out = torch.empty(n)
            kernels.gemv(layout, x, out, norm=gain if norm else None, eps=1e-5, residual=res if residual else None, swiglu=swiglu, config=config)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@on_cpu
def test_generate_with_fused_kernels():
    """Greedy text through GenerationOptions(kernels="triton") gives the usual step's tokens; where
    the kernels do not apply (two prompts: batch 1 only), the usual step runs, with a warning."""
    model = _model()
    tok = model.tokenizer
    prompt = [model.encode_prompt("A photo of a cat sitting on a mat.")]
    opts = dict(max_new_tokens=8, logit_bias={tok.eos_id: -1e9})
    expected = generate(model, prompt, GenerationOptions(**opts))
    assert generate(model, prompt, GenerationOptions(kernels="triton", **opts)) == expected
    (decoder,) = model.transformer._fused_decoders.values()  # the kernels did run, skipping the image codes' logits
    codes = model.tokenizer.code_to_id
    assert decoder.skip == (int(codes.min()), int(codes.max()) + 1) and decoder.logits[codes].eq(float("-inf")).all()
    with pytest.warns(UserWarning, match=r"batch of 2 cache rows \(batch 1 only\)"):
        assert generate(model, prompt * 2, GenerationOptions(kernels="triton", **opts)) == expected * 2
    sampled = dict(opts, temperature=0.8, seed=3)
    with pytest.warns(UserWarning, match=r"serves greedy text without a repetition penalty"):
        assert generate(model, prompt, GenerationOptions(kernels="triton", **sampled)) == generate(model, prompt, GenerationOptions(**sampled))
    # Weights replaced (.to()): the decoder, which holds the old ones, goes with them.
    model.transformer.to(torch.float64)
    assert not getattr(model.transformer, "_fused_decoders", None)


@on_cpu
def test_uncompiled_fused_generation_keeps_one_state_per_cache_bucket():
    """kernels="triton" with compile=False: prompts of five lengths share one bucketed cache, so
    the model keeps one greedy state (and on a GPU one set of graphs and one attention tuning),
    not one per length; the tokens are the usual step's."""
    model = _model()
    opts = dict(max_new_tokens=3, logit_bias={model.tokenizer.eos_id: -1e9})
    for n in range(1, 6):
        prompt = [model.encode_prompt("Hi " * n)]
        assert generate(model, prompt, GenerationOptions(kernels="triton", compile=False, **opts)) == \
            generate(model, prompt, GenerationOptions(compile=False, **opts))
    assert len(model.transformer._greedy_states) == 1


@on_cpu
def test_fused_kernels_replayed_from_emulated_cuda_graphs(monkeypatch):
    """On a GPU the fused step runs in graphs the generator captures (`_GreedyGraphs`); here with
    CUDA graphs emulated (tests/conftest.py): warm-up steps, then graphs of 2 steps and of 1 (the
    remainder), replayed by the next call on the same cache, give the eager tokens."""
    model = _model()
    events = []
    emulate_cuda_graphs(monkeypatch, model.transformer, events)
    prompt = [model.encode_prompt("A photo of a cat sitting on a mat.")]
    opts = dict(max_new_tokens=8, logit_bias={model.tokenizer.eos_id: -1e9})
    expected = generate(model, prompt, GenerationOptions(**opts))
    fused = GenerationOptions(kernels="triton", graph_steps=2, compile=True, **opts)  # compile: the kept cache
    assert generate(model, prompt, fused) == expected
    (kind, graphs), = [(key[-1], g) for key, g in model.transformer._greedy_graphs.items()]
    assert kind == "triton" and set(graphs.graphs) == {1, 2} and events.count("capture") == 2
    events.clear()
    assert generate(model, prompt, fused) == expected and events == []  # replayed, not captured again
    model.transformer.to(torch.float64)  # the graphs hold the decoder, which holds the replaced weights
    assert not model.transformer._greedy_graphs and not model.transformer.__dict__.get("_fused_decoders")


def test_skipped_range_is_the_longest_run_of_unneeded_spans():
    spans = [(0, 4), (4, 100), (100, 150), (150, 200), (200, 210)]
    assert kernels.skipped_range(spans, (0, 2)) == (4, 100)  # (longer than 150..210)
    assert kernels.skipped_range(spans, (0, 3, 4)) == (4, 150)
    assert kernels.skipped_range(spans, None) is None and kernels.skipped_range(spans, (0, 1, 2, 3, 4)) is None


@on_cpu
def test_fused_kernels_refused_where_they_cannot_apply():
    model = _model(swin_norm=True)
    cache = model.transformer.new_cache(1, 16)
    assert "swin_norm" in kernels.unsupported(model.transformer, cache)
    model = _model()
    model.transformer.layers[0].attention.wq.weight = torch.nn.Parameter(model.transformer.layers[0].attention.wq.weight.clone())
    assert "not fused" in kernels.unsupported(model.transformer, cache)
    with pytest.raises(Exception, match="kernels 'cuda'"):
        GenerationOptions(kernels="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.unsupported(_model().transformer, cache) is None


def test_cpu_model_without_a_chosen_interpreter_takes_the_usual_step():
    """Without a GPU and without TRITON_INTERPRET=1 in the environment (a user's CPU run; the
    tests set it), kernels="triton" is refused with a warning: kernels.py sets the interpreter
    only to define the kernels, which it would run ~1000x slower than the usual step."""
    code = (
        "import warnings, dataclasses\n"
        "from chameleon.config import preset\n"
        "from chameleon.tiny import TINY_VQ, random_model\n"
        "from chameleon.generate import GenerationOptions, generate\n"
        "model = random_model(dataclasses.replace(preset('tiny'), model_parallel_size=2), TINY_VQ, seed=1)\n"
        "model.transformer.fuse_()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = generate(model, [model.encode_prompt('Hi')], GenerationOptions(max_new_tokens=3, kernels='triton'))\n"
        "print(not getattr(model.transformer, '_fused_decoders', None), [str(x.message) for x in w])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("True") and "no GPU" in done.stdout, done.stdout


def test_kernels_compile_for_hopper_without_spills_and_with_wide_loads():
    """Compiled for sm_90 (H100, H200) as Triton's JIT would specialise them for a 7B model in
    bf16 (tests/hopper_compile.py; no GPU needed): every candidate block configuration compiles,
    spills no registers, and streams the weights in 128-bit loads marked evict-first."""
    done = subprocess.run([sys.executable, "tests/hopper_compile.py"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 5 * (len(kernels.GEMV_CONFIGS) - 1) + len(kernels.ATTENTION_CONFIGS) + 2  # (all but CUBLAS; 2 combines)
    assert [r["variant"] for r in rows if r["spilled_bytes"]] == []
    gemvs = [r for r in rows if r["variant"].startswith("gemv")]
    assert all(r["weight_loads"] == ["ld.global.L1::evict_first.L2::cache_hint.v4.b32"] for r in gemvs), gemvs


# Ops whose CUDA kernels read a device value on the host (.item(), nonzero's size): a sync, which
# CUDA graph capture refuses ("operation not permitted when stream is capturing").
_HOST_SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
               "aten::masked_fill.Tensor", "aten::masked_fill_.Tensor", "aten::fill_.Tensor", "aten::index_fill_.int_Tensor"}


@on_cpu
def test_fused_greedy_step_runs_no_op_that_syncs_with_the_host():
    """On a GPU the fused greedy step runs eagerly inside a CUDA graph capture (`_GreedyGraphs`;
    unlike the inductor step, whose graph compiles such ops away), so none of its ops may read a
    device value on the host (masked_fill with a tensor value did: .item()). Recorded here on the
    CPU, where such ops pass unnoticed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from chameleon.generate import _TextState

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.name()
            if name in ("aten::index.Tensor", "aten::index_put_", "aten::index_put") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                name += " (boolean mask: nonzero)"
            self.seen.add(name)
            return func(*args, **kwargs)

    model = _model()
    t = model.transformer
    cache = _prefilled(t, 20, [3])
    state = _TextState(1, cache.max_seq_len, t.args.vocab_size, "cpu")
    state.reset(torch.zeros(t.args.vocab_size), {1, 2}, 0, [19], 20)
    decoder = kernels.fused_decoder(t)
    with torch.no_grad():
        state.advance(torch.randn(1, t.args.vocab_size))
        with Ops() as ops:
            decoder.greedy_step(cache, state)
    assert ops.seen and not {n for n in ops.seen if n in _HOST_SYNCS or "nonzero" in n}, sorted(ops.seen)


@on_cpu
def test_tuner_times_every_candidate_once_and_keeps_the_fastest(monkeypatch):
    """`_tuned`'s bookkeeping, with triton's do_bench replaced by a clock that calls the launch
    and reports a set time (on a GPU it times it): every candidate is tried once, one that does not
    fit the GPU is left out, the fastest is kept and reused without timing again, and work below
    TUNED_FROM takes the fixed choice untimed."""
    import triton.testing

    fastest, too_big = kernels.GEMV_CONFIGS[3], kernels.GEMV_CONFIGS[4]
    timed = []

    def clock(fn, warmup, rep):
        fn()
        if timed[-1] == too_big:  # (as its compilation would raise on a GPU)
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        return 1.0 if timed[-1] == fastest else 2.0

    def launch(config):
        timed.append(config)

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(triton.testing, "do_bench", clock)
    key = ("gemv", "plain", 64, 64, (64, 1), torch.float32, torch.float32, torch.device("cpu"))
    assert kernels._tuned(key, launch, kernels.GEMV_CONFIGS, size=1 << 20) == fastest
    assert timed == kernels.GEMV_CONFIGS
    assert kernels._tuned(key, launch, kernels.GEMV_CONFIGS, size=1 << 20) == fastest and len(timed) == len(kernels.GEMV_CONFIGS)
    assert list(kernels.chosen_configs().values()) == [fastest]
    assert kernels._tuned(("attention",), launch, kernels.ATTENTION_CONFIGS, size=1000) == kernels.SMALL_CONFIG["attention"]


def _stand_in_tuner(monkeypatch, tmp_path, fastest):
    """`_tuned` with a clock in place of do_bench that reports `fastest[0]` fastest, and its choices
    recorded in tmp_path/choices.json; returns the list of configs timed."""
    import triton.testing

    timed = []

    def clock(fn, warmup, rep):
        fn()
        return 1.0 if timed[-1] == fastest[0] else 2.0

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(triton.testing, "do_bench", clock)
    monkeypatch.setenv(kernels.CONFIGS_ENV, str(tmp_path / "choices.json"))
    return timed


GEMV_KEY = ("gemv", "norm", 64, 64, (64, 1), torch.float32, torch.float32, torch.device("cpu"))
ATTENTION_KEY = ("attention", 4, 2, 16, 160, torch.float32, torch.device("cpu"))


@on_cpu
def test_tuner_records_its_choices_and_takes_recorded_ones_untimed(monkeypatch, tmp_path):
    """With CHAMELEON_KERNEL_CONFIGS=FILE a choice is written there under the device's name, and a
    later process (here: the in-memory choices dropped) takes it without timing, even where its
    own timing would differ; entries for other GPUs are kept; a config the candidates no longer
    hold is timed again and replaced; one recorded by another process during the timing wins."""
    fastest = [(8, 512, 4)]
    timed = _stand_in_tuner(monkeypatch, tmp_path, fastest)
    launch = timed.append
    path = tmp_path / "choices.json"
    other_gpu = {"NVIDIA H200": {"gemv plain 1 1": [4, 512, 4]}}
    path.write_text(json.dumps(other_gpu))
    assert kernels._tuned(GEMV_KEY, launch, kernels.GEMV_CONFIGS, size=1 << 20) == (8, 512, 4)
    assert len(timed) == len(kernels.GEMV_CONFIGS)
    gemv_name = "gemv norm 64 64 (64, 1) torch.float32 torch.float32"
    assert json.loads(path.read_text()) == {**other_gpu, "cpu": {gemv_name: [8, 512, 4]}}

    fastest[0] = (None, None, None)  # never fastest: attention's timing falls to its first candidate
    assert kernels._tuned(ATTENTION_KEY, launch, kernels.ATTENTION_CONFIGS, size=1 << 20) == kernels.ATTENTION_CONFIGS[0]
    recorded = json.loads(path.read_text())["cpu"]
    assert recorded["attention 4 2 16 160 torch.float32"] == list(kernels.ATTENTION_CONFIGS[0])  # (None as null)

    monkeypatch.setattr(kernels, "_chosen", {})
    timed.clear()
    fastest[0] = kernels.CUBLAS
    assert kernels._tuned(GEMV_KEY, launch, kernels.GEMV_CONFIGS, size=1 << 20) == (8, 512, 4)
    assert kernels._tuned(ATTENTION_KEY, launch, kernels.ATTENTION_CONFIGS, size=1 << 20) == kernels.ATTENTION_CONFIGS[0]
    assert timed == []

    monkeypatch.setattr(kernels, "_chosen", {})
    path.write_text(json.dumps({"cpu": {gemv_name: [3, 3, 3]}}))
    with pytest.warns(UserWarning, match=r"choices.json: 'cpu' / 'gemv norm 64 64 .*\[3, 3, 3\] is not among this version's candidates"):
        assert kernels._tuned(GEMV_KEY, launch, kernels.GEMV_CONFIGS, size=1 << 20) == kernels.CUBLAS
    assert json.loads(path.read_text()) == {"cpu": {gemv_name: ["cublas"]}}
    assert not list(tmp_path.glob("*.tmp"))

    # Another process (torchrun's start together) records its choice while this one times: both keep that one.
    monkeypatch.setattr(kernels, "_chosen", {})
    path.write_text("{}")
    fastest[0] = (8, 512, 4)

    def meanwhile(config):
        timed.append(config)
        path.write_text(json.dumps({"cpu": {gemv_name: [4, 512, 4]}}))

    assert kernels._tuned(GEMV_KEY, meanwhile, kernels.GEMV_CONFIGS, size=1 << 20) == (4, 512, 4)
    assert json.loads(path.read_text()) == {"cpu": {gemv_name: [4, 512, 4]}}


def test_processes_recording_kernel_choices_at_once_keep_every_choice(tmp_path):
    """Processes that add choices to one CHAMELEON_KERNEL_CONFIGS file at the same moment (torchrun's
    start together, each timing its own kernels) keep all of them: each reads, merges and replaces
    the file under a lock, so none replaces it with a copy read before another's write."""
    path, processes, choices = tmp_path / "choices.json", 4, 40
    script = (
        "import sys, time\n"
        "from chameleon import kernels\n"
        "rank, path, n, start = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "for i in range(n):\n"
        "    kernels._record(path, 'cpu', f'gemv {rank} {i}', kernels.CUBLAS, kernels.GEMV_CONFIGS)\n"
    )
    start = __import__("time").time() + 3  # (after every interpreter has imported torch)
    running = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(path), str(choices), str(start)])
               for rank in range(processes)]
    assert [p.wait(timeout=120) for p in running] == [0] * processes
    recorded = json.loads(path.read_text())["cpu"]
    assert sorted(recorded) == sorted(f"gemv {rank} {i}" for rank in range(processes) for i in range(choices))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.json"]  # (no lock or temporary file left)


@on_cpu
@pytest.mark.parametrize("content, expected", [
    ("{not json", r"choices.json: not JSON \(.*\); expected the file chameleon's kernels write there"),
    ('["cpu"]', r"choices.json: expected an object \{GPU name: \{kernel: config\}\}"),
    ("DIRECTORY", r"choices.json: cannot read it \(Is a directory\)"),
    ("NO PARENT", r"choices.json: cannot write it \(No such file or directory\)"),
])
def test_a_bad_kernel_choices_file_is_named_and_left_as_it_was(monkeypatch, tmp_path, content, expected):
    """An unreadable, malformed or unwritable CHAMELEON_KERNEL_CONFIGS file is an InputError
    naming it (the CLI's exit 2), and a malformed one is not overwritten."""
    timed = _stand_in_tuner(monkeypatch, tmp_path, [kernels.CUBLAS])
    path = tmp_path / "choices.json"
    if content == "DIRECTORY":
        path.mkdir()
    elif content == "NO PARENT":
        path = tmp_path / "missing" / "choices.json"
        monkeypatch.setenv(kernels.CONFIGS_ENV, str(path))
    else:
        path.write_text(content)
    with pytest.raises(kernels.InputError, match=f"CHAMELEON_KERNEL_CONFIGS=.*{expected}"):
        kernels._tuned(GEMV_KEY, timed.append, kernels.GEMV_CONFIGS, size=1 << 20)
    assert content in ("DIRECTORY", "NO PARENT") or path.read_text() == content


@on_cpu
def test_a_failed_write_of_the_kernel_choices_file_leaves_no_temporary_file(monkeypatch, tmp_path):
    """A write that fails part-way (a full disk) is an InputError naming the file, which keeps its
    content, and leaves no partial temporary copy beside it."""
    timed = _stand_in_tuner(monkeypatch, tmp_path, [kernels.CUBLAS])
    path = tmp_path / "choices.json"
    path.write_text("{}")
    real_write = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(kernels.InputError, match=r"choices.json: cannot write it \(No space left on device\)"):
        kernels._tuned(GEMV_KEY, timed.append, kernels.GEMV_CONFIGS, size=1 << 20)
    monkeypatch.undo()
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["choices.json"]


@on_cpu
def test_decode_benchmark_warm_up_captures_every_graph_the_timed_runs_replay(monkeypatch):
    """benchmarks/perf/decode.py: with graphs of N steps and fewer than 2N + 1 new tokens (the
    profile stage: 32 tokens, N = 16), one warm-up run spends its only N-step call on uncaptured
    warm-up steps, so the first timed run captured the N-step graph: the warm-up runs twice."""
    perf = str(Path(__file__).resolve().parents[1] / "benchmarks" / "perf")
    sys.path.insert(0, perf)
    try:
        import decode
    finally:
        sys.path.remove(perf)
    model = _model()
    events = []
    emulate_cuda_graphs(monkeypatch, model.transformer, events)
    prompts = decode.random_prompts(model.tokenizer, 1, 8, seed=0).tolist()
    competitor = decode.ours_competitor(model, prompts, True, graph_steps=4, kernels="triton")
    timed = []
    real_run = competitor.run

    def run(n):  # the timed runs are the calls after the first yield's
        timed.append(events.count("capture"))
        return real_run(n)

    competitor.run = run
    for _ in decode.time_side_by_side([competitor], 1, 8, 8, torch.device("cpu"), repeats=1):
        pass
    assert events.count("capture") == 2  # graphs of 4 steps and of 1
    assert timed[-2] == timed[-1] == 2  # both captured before the timed runs (of 1, then 8 new tokens)
