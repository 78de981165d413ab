"""The speed benchmarks run end to end on a tiny shape (its figures are not checked: timings belong in
benchmarks/perf/RESULTS.md, not in tests), writes its versioned fields, and in fp32 both stacks pick
the same greedy tokens."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, ok: bool = True, drop_env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """benchmarks/perf/<script> with these arguments, offline; it must succeed (`ok`), or fail.
    `drop_env`: variables of this process left out of the script's environment."""
    env = {**{k: v for k, v in os.environ.items() if k not in drop_env}, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, f"benchmarks/perf/{script}", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def test_decode_benchmark_side_by_side(tmp_path):
    # Decode time = fastest N-token run - fastest 1-token run: N must be large enough that timing
    # noise on a loaded machine cannot make it negative.
    out = tmp_path / "decode.json"
    run_script("decode.py", "--preset", "tiny", "--dtypes", "fp32", "--batches", "1,2", "--new-tokens", "24", "--repeats", "2",
               "--hf-caches", "dynamic,static", "--json", out)
    report = json.loads(out.read_text())
    assert [(r["dtype"], r["batch"]) for r in report["rows"]] == [("fp32", 1), ("fp32", 2)]
    for row in report["rows"]:
        for name in ("hf_default", "hf_static"):
            assert row[name]["decode_tok_s"] > 0 and row[f"decode_ratio_vs_{name}"] > 0
            assert row[f"same_tokens_as_{name}"] is True, row
            assert row[f"leading_tokens_agreeing_{name}"] == [24] * row["batch"]


def test_text_loop_benchmark(tmp_path):
    done = run_script("text_loop.py", "--preset", "tiny", "--batches", "1,3", "--new-tokens", "6", "--repeats", "1")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["workload"], r["batch"]) for r in rows] == [(w, b) for w in ("greedy_stop_strings", "sampled", "interleaved_image") for b in (1, 3)]
    assert all(r["speedup"] > 0 for r in rows)
    # new tokens per row: 6 of text, or the image (boi + 256 codes + eoi) and 2 tokens
    assert [r["new_tokens"] for r in rows] == [6] * 4 + [260] * 2


def test_text_loop_counts_the_tokens_of_every_row(monkeypatch):
    """text_loop.py reported row 0's token count as every row's: a row that ended early (an eos
    after the image, which that workload did not keep out) went unnoticed, and so did loops that
    decoded different counts (a GPU's loops draw other image codes, then other text)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "perf"))
    import text_loop

    same = {"device_loop": [[5, 6, 7], [8, 9, 10]], "general_loop": [[5, 6, 7], [8, 9, 11]]}
    assert text_loop.tokens_per_row(same) == 3
    for uneven in ({"device_loop": [[5, 6, 7], [8, 9]], "general_loop": [[5, 6, 7], [8, 9]]},
                   {"device_loop": [[5, 6, 7]], "general_loop": [[5, 6]]}):
        with pytest.raises(SystemExit, match="rows decoded different numbers of new tokens"):
            text_loop.tokens_per_row(uneven)


def test_caption_scoring_times_the_pipelines_in_turns(monkeypatch):
    """caption_scoring.py timed ours first in every round, so on a shared machine whose speed
    drifts ours always met the earlier phase; rounds reverse the order every other time now, as
    decode.py's do (one helper for both)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "perf"))
    import caption_scoring

    order = []
    ours_s, ours, base_s, base = caption_scoring.timed_pair(lambda: order.append("ours") or "o", lambda: order.append("base") or "b", 4)
    assert order == ["ours", "base", "base", "ours"] * 2
    assert (ours, base) == ("o", "b") and ours_s >= 0 and base_s >= 0


def test_sampling_benchmark():
    done = run_script("sampling.py", "--vocab", "5000", "--batches", "1,3", "--rounds", "2", "--calls", "2")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["batch"], r["shape"]) for r in rows] == [(b, s) for b in (1, 3) for s in ("zipf1.5", "zipf1.2", "zipf1.0", "normal")]
    assert all(r["speedup"] > 0 and 0 < r["nucleus_median"] <= 5000 for r in rows)


def test_caption_prompts_benchmark(tmp_path):
    out = tmp_path / "caption_prompts.json"
    run_script("caption_prompts.py", "--photos", "3,6", "--json", out)
    report = json.loads(out.read_text())
    assert [r["photos"] for r in report["rows"]] == [3, 6] and all(r["peak_rss_mib"] > 0 for r in report["rows"])
    assert report["decoded_photo_mib"] > 0.5  # the shipped COCO photos are ~640x480 RGB


def test_decode_benchmark_restricts_attention_for_the_whole_run(tmp_path):
    """--sdpa-backend holds for the run (a dropped sdpa_kernel context restored every backend at
    once, so the flag did nothing), and the report says which backends were left enabled."""
    out = tmp_path / "decode.json"
    run_script("decode.py", "--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--batches", "1", "--new-tokens", "4",
               "--repeats", "1", "--no-hf", "--sdpa-backend", "math", "--json", out)
    report = json.loads(out.read_text())
    assert report["sdpa_backend"] == "math" and report["sdpa_enabled"] == ["math"]


def test_decode_benchmark_times_the_fused_kernels(tmp_path):
    """--triton times our decode on the fused Triton kernels beside the default path at batch 1
    (here in Triton's interpreter: the figures mean nothing, the tokens must agree)."""
    out = tmp_path / "decode.json"
    # (the script chooses the interpreter itself on the CPU, as a rehearsal of gpu_check.sh would run it)
    run_script("decode.py", "--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--batches", "1,2", "--new-tokens", "4",
               "--prompt-len", "16", "--repeats", "1", "--no-hf", "--triton", "--json", out, drop_env=("TRITON_INTERPRET",))
    report = json.loads(out.read_text())
    one, two = report["rows"]
    assert report["triton"] is True and one["ours_triton"]["decode_tok_s"] > 0
    assert one["same_tokens_as_ours_triton"] is True and one["leading_tokens_agreeing_ours_triton"] == [4]
    assert "ours_triton" not in two  # batch 1 only
    # Where the fused path is refused (here: a head_dim of 24), it would time the usual step
    # under its name: the script stops instead, saying why.
    done = run_script("decode.py", "--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--batches", "1", "--new-tokens", "4",
                      "--prompt-len", "16", "--repeats", "1", "--no-hf", "--shape", "dim=96", "--triton", ok=False)
    assert "kernels='triton' does not apply here (head_dim 24 is not a power of 2" in done.stderr, done.stderr[-3000:]


BAD_ARGUMENTS = [  # script, arguments, the flag the error must name
    ("decode.py", ["--batches", "1,x"], "--batches"),
    ("decode.py", ["--dtypes", "fp16"], "--dtypes"),
    ("decode.py", ["--hf-caches", "statc"], "--hf-caches"),  # was ignored: no transformers competitor at all
    ("decode.py", ["--new-tokens", "1"], "--new-tokens"),  # was a decode speed of -0.0 tok/s
    ("decode.py", ["--repeats", "0"], "--repeats"),  # was taken as the default, 5
    ("decode.py", ["--device", "cdua"], "--device"),
    ("decode.py", ["--preset", "bogus"], "--preset"),
    ("decode.py", ["--shape", "dim"], "--shape"),
    ("decode.py", ["--shape", "foo=3"], "--shape"),  # was exit 1
    ("decode.py", ["--prompt-len", "1000"], "--prompt-len"),  # was generate's error after building both stacks
    ("decode.py", ["--device", "cpu", "--no-fuse"], "--no-fuse"),  # was reported "fused": false, the CPU path fused
    ("decode.py", ["--device", "cpu", "--sdpa-backend", "efficient"], "--sdpa-backend"),  # was a RuntimeError mid-run
    ("text_loop.py", ["--workloads", "greedy"], "--workloads"),
    ("text_loop.py", ["--preset", "tiny", "--new-tokens", "300"], "--new-tokens"),  # was an AssertionError
    ("sampling.py", ["--shapes", "zipf"], "--shapes"),
    ("sampling.py", ["--calls", "0"], "--calls"),
    ("mmlu_loglikelihood.py", ["--subjects", "0"], "--subjects"),  # was a ZeroDivisionError after building the model
    ("caption_prompts.py", ["--photos", "3,3"], "--photos"),  # was a ZeroDivisionError after both runs
    ("caption_scoring.py", ["--repeat", "0"], "--repeat"),
    # were written only after the timed runs (decode.py: before it printed them), which were lost
    ("decode.py", ["--json", "no/such/dir/decode.json"], "--json"),
    ("mmlu_loglikelihood.py", ["--json", "no/such/dir/mmlu.json"], "--json"),
    ("caption_prompts.py", ["--json", "no/such/dir/prompts.json"], "--json"),
    ("convert_memory.py", ["--dim", "256", "--layers", "1", "--json", "no/such/dir/memory.json"], "--json"),
    ("convert_memory.py", ["--dim", "128"], "--dim"),  # was a traceback from the child building the model
    # devices that do not exist here were taken, and failed later in the run with a traceback
    ("decode.py", ["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),  # one past the last GPU
    *([("decode.py", ["--device", "mps"], "--device")] if not torch.backends.mps.is_available() else []),
]


# Runs each case as its script's __main__ in one process of its own (one torch import for all: a
# process per case cost ~3 s each), and prints each one's exit status and stderr; an exception
# other than argparse's SystemExit is reported with its traceback, as a process would print it.
REFUSAL_RUNNER = """
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, "benchmarks/perf")
results = []
for script, args in json.loads(sys.argv[1]):
    sys.argv, err, code = [script, *args], io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(f"benchmarks/perf/{script}", run_name="__main__")
    except SystemExit as done:
        code = done.code
    except BaseException:
        code, err = 1, io.StringIO(err.getvalue() + traceback.format_exc())
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def refusals() -> list[tuple[int, str]]:
    """Each BAD_ARGUMENTS case's exit status and stderr."""
    cases = json.dumps([[script, args] for script, args, _ in BAD_ARGUMENTS])
    done = subprocess.run([sys.executable, "-c", REFUSAL_RUNNER, cases], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)), ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_any_work(case, refusals):
    (code, stderr), flag = refusals[case], BAD_ARGUMENTS[case][2]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "error: " in stderr and flag in stderr, stderr[-3000:]


def test_perf_scripts_refuse_to_reuse_a_model_of_another_shape(tmp_path):
    """--work / --model-dir reuse what an earlier run built there: one built with another shape was
    timed and reported as the shape asked for. Both scripts now refuse it, naming the directory."""
    from chameleon.config import preset
    from chameleon.tiny import build_tiny_model

    work = tmp_path / "work"  # what convert_memory.py reuses: params.txt and its sources, hf/ the first
    build_tiny_model(work / "hf", "hf")
    (work / "params.txt").write_text("1000")
    done = run_script("convert_memory.py", "--dim", "256", "--layers", "1", "--work", work, ok=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"argument --work: {work / 'hf'} holds a model built with dim=" in done.stderr, done.stderr[-3000:]
    assert "not the dim=256, n_layers=1, n_heads=2 asked for" in done.stderr, done.stderr[-3000:]

    done = run_script("mmlu_loglikelihood.py", "--subjects", "1", "--per-subject", "1", "--model-dir", work / "hf", ok=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"argument --model-dir: {work / 'hf'} holds a model built with dim=" in done.stderr, done.stderr[-3000:]
    # ...while one of the shape asked for is reused, though read back its n_kv_heads is None (no GQA)
    perf = str(ROOT / "benchmarks" / "perf")
    sys.path.insert(0, perf)
    try:
        from perf_args import check_built
    finally:
        sys.path.remove(perf)
    tiny = dataclasses.replace(preset("tiny"), n_kv_heads=None, model_parallel_size=2)
    build_tiny_model(tmp_path / "mha", "hf", args=tiny)
    asked = {"dim": tiny.dim, "n_layers": tiny.n_layers, "n_heads": tiny.n_heads, "n_kv_heads": tiny.n_heads}
    assert check_built(argparse.ArgumentParser(), "--model-dir", tmp_path / "mha", asked) is None


def run_gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    """gpu_check.sh rehearsed on the CPU (the tiny preset) with its report in `out`; its stage
    decode_7b only, unless `env` says otherwise."""
    env = {**os.environ, "OUT": str(out), "DECODE_ARGS": "--preset tiny --device cpu", "STAGES": "decode_7b", **env,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "benchmarks/perf/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def test_gpu_check_keeps_to_its_deadline(tmp_path):
    """gpu_check.sh cuts each stage's limit to what is left of TOTAL_S, and skips a stage (saying so)
    with under 30 s left: its stages' own limits add up to more than one device call."""

    def gpu_check(out: Path, total_s: int) -> list[str]:
        run_gpu_check(out, DECODE_S="120", TOTAL_S=str(total_s))
        return (out / "run.txt").read_text().splitlines()

    decode = next(line for line in gpu_check(tmp_path / "a", 90) if line.startswith("decode_7b:"))
    # Done, or stopped at its limit (a loaded machine; which shows the deadline applied as well)
    done = re.fullmatch(r"decode_7b: exit (0|124) after (\d+) s \(limit (\d+) s\)", decode)
    assert done, decode
    seconds, limit = int(done[2]), int(done[3])
    assert 30 <= limit <= 90 and seconds <= limit + 5, decode  # TOTAL_S's rest, not DECODE_S
    skipped = next(line for line in gpu_check(tmp_path / "b", 0) if line.startswith("decode_7b:"))
    assert skipped.startswith("decode_7b: skipped") and skipped.endswith("s left of TOTAL_S=0"), skipped
    assert not (tmp_path / "b" / "decode_7b.log").exists()


def test_gpu_check_refuses_limits_that_are_not_seconds(tmp_path):
    """TOTAL_S and the stages' limits go through bash arithmetic (under set -u): a value that is not
    whole seconds is named, not an abort of the whole script ('abc: unbound variable') nor a deadline
    silently not applied ('4m')."""
    done = run_gpu_check(tmp_path / "a", TOTAL_S="9m")
    assert done.returncode == 2 and "TOTAL_S=9m: expected whole seconds" in done.stderr, done.stderr
    assert (tmp_path / "a" / "run.txt").read_text().splitlines() == ["TOTAL_S=9m: expected whole seconds"]
    for limit in ("abc", "4m", "08"):
        out = tmp_path / f"limit_{limit}"
        run_gpu_check(out, DECODE_S=limit)
        lines = (out / "run.txt").read_text().splitlines()
        assert f"decode_7b: skipped, its limit {limit!r} is not whole seconds" in lines, lines
        assert not (out / "decode_7b.log").exists()


def test_random_prompts_are_text_that_generate_accepts(tiny_model, monkeypatch):
    """decode.py's prompts are random text: an image code or control token among them would make a
    prompt the benchmark did not mean (a begin-of-image followed by text is refused by generate)."""
    from chameleon.generate import non_text_mask

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "perf"))
    import decode

    tok = tiny_model.tokenizer
    ids = decode.random_prompts(tok, 64, 512, seed=0)
    assert (ids[:, 0] == tok.bos_id).all()
    assert not non_text_mask(tok, tok.vocab_size, "cpu")[ids[:, 1:]].any()


def test_decode_help_names_every_preset():
    """--preset's help lists each choice (34B, the 30B's other name, was missing) and the one default."""
    from chameleon.config import PRESETS

    text = " ".join(run_script("decode.py", "--help").stdout.split())
    shapes = re.search(r"--preset \{[^}]*\} model shape: (.*?) --shape SHAPE", text)[1]
    assert shapes.startswith("100M (default, on every device)") and all(name in shapes for name in PRESETS), shapes


def test_decode_time_lost_in_noise_is_reported_as_unmeasured(monkeypatch):
    """Decode time is the fastest N-token run less the fastest 1-token run; where timing noise makes
    that zero or negative (a short run on a loaded machine), decode speed is reported as null, not
    as a negative rate, a division by zero, or ratios and a roofline fraction made of them."""
    import time

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "perf"))
    import decode

    def sleeper(one_token_s, n_token_s):
        return lambda n: (time.sleep(one_token_s if n == 1 else n_token_s), [[0] * n])[1]

    competitors = [decode.Competitor("ours", sleeper(0.03, 0.01)), decode.Competitor("hf_default", sleeper(0.001, 0.02))]
    speeds, _ = list(decode.time_side_by_side(competitors, batch=1, prompt_len=4, new_tokens=3, device=torch.device("cpu"), repeats=1))[-1]
    assert speeds["ours"]["decode_tok_s"] is None and speeds["ours"]["prefill_tok_s"] > 0
    assert speeds["hf_default"]["decode_tok_s"] > 0
    row = decode.compare(speeds, {"ours": [[0] * 3], "hf_default": [[0] * 3]}, weight_bytes=10, bw=100.0, batch=1)
    assert row["decode_ratio_vs_hf_default"] is None and row["fraction_of_roofline"] is None
