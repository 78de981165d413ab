"""`chameleon-bench run` end to end, as real processes: resume after kill -9, batch size, torchrun."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SUITE = """\
name: test
backend: chameleon
seed: 7
batch_size: 4
benchmarks:
  - {name: gsm8k, benchmark: gsm8k, shots: 2, limit: 3, generation: {max_gen_toks: 10}}
  - {name: gsm8k_maj, benchmark: gsm8k, shots: 1, k: 3, limit: 2,
     generation: {max_gen_toks: 6, do_sample: true, temperature: 0.8}}
  - {name: mmlu, benchmark: mmlu, shots: 2, limit: 1}
  - {name: coco, benchmark: coco, shots: 1, subset: with_images, limit: 3, generation: {max_gen_toks: 8}}
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def cli(*args, check=True, prefix=(sys.executable, "-m", "benchmarks.cli"), cwd=REPO):
    proc = subprocess.run([*prefix, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def comparable(run: Path) -> dict:
    """What must not depend on how a run was executed: metrics, counts and every per-sample record."""
    res = json.loads((run / "results.json").read_text())
    assert res["complete"] and res["schema_version"] == 1
    out = {"model": res["model"]["fingerprint"], "data": res["data_files"]}
    for name, b in res["benchmarks"].items():
        recs = [json.loads(line) for line in (run / b["samples_file"]).read_text().splitlines()]
        out[name] = {"metrics": {k: round(m["value"], 6) for k, m in b["metrics"].items()},
                     "n": (b["n_items"], b["n_failed"]), "samples": _round(recs),
                     "task_configs": b.get("task_configs")}  # the protocol as run: one text in every process
    return out


def _round(obj):
    # loglikelihoods from different batch compositions agree to float32 rounding, not bit for bit
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, list):
        return [_round(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "test.yaml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def baseline(suite, tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "baseline"
    proc = cli("run", suite, "--model", tiny_hf, "--out", out, cwd=out.parent)  # not a git checkout, as a user's may be
    assert "gsm8k_maj" in proc.stdout and "CIDEr" in proc.stdout  # the results table
    (out.parent / "baseline.stderr").write_text(proc.stderr)
    return out


def console_lines(text: str) -> list[str]:
    """What a terminal would have printed, one entry per redraw of a progress bar."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def summary_lines(stderr: str, name: str) -> list[str]:
    return [line for line in console_lines(stderr) if re.match(rf"{name}\s+\S+ .* \| n=\d+, \d+ failed \| ", line)]


def test_console_output_one_bar_and_summary_per_benchmark(baseline):
    stderr = (baseline.parent / "baseline.stderr").read_text()
    lines = console_lines(stderr)
    for noise in ("Overwriting default num_fewshot", "specified through cli", "Map:", "\x1b[A", "generate_until (",
                  "chameleon loglikelihood", "chameleon generate", "not a git repository"):
        assert noise not in stderr, noise
    for name, n_requests in (("gsm8k", 3), ("gsm8k_maj", 6), ("mmlu", 57 * 4), ("coco", 3)):
        bars = [line for line in lines if re.match(rf"{name}\s+\d+%\|.*\| \d+/{n_requests} \[", line)]
        assert bars and f"{n_requests}/{n_requests}" in bars[-1], (name, lines)
        assert len(summary_lines(stderr, name)) == 1, (name, lines)
    mmlu = summary_lines(stderr, "mmlu")[0]
    assert "acc,none" in mmlu and "n=57, 0 failed" in mmlu and "228 requests computed" in mmlu
    assert "benchmark  metric" not in stderr  # the table is on stdout, the bars are not
    # after its requests, captioning's bar says how scoring goes (SPICE takes minutes on a full test split)
    coco_bars = [line for line in lines if line.startswith("coco ") and "3/3" in line]
    assert any("computing CIDEr" in line for line in coco_bars) and "scored 3 images in" in coco_bars[-1], coco_bars
    assert not [line for line in lines if not re.match(r"(gsm8k|gsm8k_maj|mmlu|coco)\s", line)], lines


def test_verbose_restores_lm_eval_logging(tiny_hf, tmp_path):
    suite = tmp_path / "one.yaml"
    suite.write_text("name: one\nbenchmarks:\n  - {name: gsm8k, benchmark: gsm8k, shots: 1, limit: 1,"
                     " generation: {max_gen_toks: 2}}\n")
    proc = cli("run", suite, "--model", tiny_hf, "--out", tmp_path / "run", "--verbose")
    assert "Overwriting default num_fewshot of chameleon_gsm8k_cot from 8 to 1" in proc.stderr
    assert len(summary_lines(proc.stderr, "gsm8k")) == 1


def test_hf_backend_console_has_no_library_bars(tiny_hf, tmp_path):
    # transformers is first imported when the hf backend loads, after the console was quieted
    suite = tmp_path / "one.yaml"
    suite.write_text("name: one\nbenchmarks:\n  - {name: gsm8k, benchmark: gsm8k, shots: 1, limit: 1,"
                     " generation: {max_gen_toks: 2}}\n")
    proc = cli("run", suite, "--backend", "hf", "--model", tiny_hf, "--out", tmp_path / "run")
    assert "Loading weights" not in proc.stderr
    assert not [line for line in console_lines(proc.stderr) if not line.startswith("gsm8k ")], proc.stderr


def test_results_and_samples_schema(baseline):
    res = json.loads((baseline / "results.json").read_text())
    assert {"schema_version", "model", "suite", "seeds", "packages", "data_files", "run", "benchmarks"} <= res.keys()
    assert len(res["model"]["fingerprint"]) == 64
    for path, digest in res["data_files"].items():
        assert (REPO / path).is_file() and len(digest) == 64
    mmlu = res["benchmarks"]["mmlu"]
    assert mmlu["lm_eval"]["lm_eval_version"] == importlib.metadata.version("lm_eval")
    m = mmlu["metrics"][mmlu["primary_metric"]]
    assert m["n"] == 57 and 0 <= m["value"] <= 1
    coco = res["benchmarks"]["coco"]
    assert coco["n_items"] == 3 and coco["metrics"]["CIDEr"]["ci95"] is not None
    cap = json.loads((baseline / "samples/coco.jsonl").read_text().splitlines()[0])
    assert cap["request_hash"] and cap["item_hash"] and cap["generation_hash"] and len(cap["images"]) == 2
    assert all(len(i["sha256"]) == 64 for i in cap["images"])
    maj = [json.loads(x) for x in (baseline / "samples/gsm8k_maj.jsonl").read_text().splitlines()]
    assert len(maj[0]["output"][0]) == 3  # k samples kept per item


def test_kill_9_then_resume_equals_uninterrupted(suite, tiny_hf, baseline, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "benchmarks.cli", "run", str(suite), "--model", str(tiny_hf), "--out", str(out),
           "--chunk-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = out / "cache" / "rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not cache.exists() or cache.read_bytes().count(b"\n") < 30):
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = cache.read_bytes().count(b"\n")
    assert not (out / "results.json").exists() or not json.loads((out / "results.json").read_text())["complete"]
    cli(*cmd[3:])  # the same command again
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) > done  # finished work kept, nothing twice
    assert comparable(out) == comparable(baseline)
    res = json.loads((out / "results.json").read_text())
    assert sum(b["computed_requests"] for b in res["benchmarks"].values()) == len(keys) - done


def test_results_independent_of_batch_size(suite, tiny_hf, baseline, tmp_path):
    out = tmp_path / "bs1"
    cli("run", suite, "--model", tiny_hf, "--out", out, "--batch-size", "1")
    assert comparable(out) == comparable(baseline)


def test_torchrun_two_processes_equal_single(suite, tiny_hf, baseline, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = cli("--standalone", "--nproc-per-node", "2", "-m", "benchmarks.cli", "run", suite, "--model", tiny_hf,
               "--out", out, prefix=(str(torchrun),))
    assert len(summary_lines(proc.stderr, "mmlu")) == 1  # only rank 0 reports progress
    assert "chameleon loglikelihood" not in proc.stderr
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    assert all(p.stat().st_size > 0 for p in (out / "cache").iterdir())  # both processes did work
    assert comparable(out) == comparable(baseline)
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["world_size"] == 2
    computed = {name: b["computed_requests"] for name, b in res["benchmarks"].items()}  # both ranks' shares
    assert computed == {name: b["computed_requests"] for name, b in
                        json.loads((baseline / "results.json").read_text())["benchmarks"].items()}
    assert "228 requests computed, 0 cached" in summary_lines(proc.stderr, "mmlu")[0]


def test_two_backends_pair_item_by_item(suite, tiny_hf, baseline, tmp_path):
    """SCHEMA.md's recipe: sample records of two runs (here our stack and transformers on the same
    checkpoint, in another process) join one to one on (benchmark, item_hash, filter), and the
    joined records differ only in what the model produced; the hashes that prove the prompts and
    settings equal are equal."""
    cli("run", suite, "--backend", "hf", "--model", tiny_hf, "--out", tmp_path / "hf")

    def records(run):
        res = json.loads((run / "results.json").read_text())
        recs = [json.loads(line) for b in res["benchmarks"].values() for line in (run / b["samples_file"]).read_text().splitlines()]
        keyed = {(r["benchmark"], r["item_hash"], r.get("filter")): r for r in recs}  # (captioning: no filter)
        assert len(keyed) == len(recs)
        return keyed

    ours, theirs = records(baseline), records(tmp_path / "hf")
    assert ours.keys() == theirs.keys() and {b for b, _, _ in ours} == {"gsm8k", "gsm8k_maj", "mmlu", "coco"}
    outputs = {"output", "filtered_output", "prediction", "score"}
    for key, rec in ours.items():
        assert {k: v for k, v in rec.items() if k not in outputs} == {k: v for k, v in theirs[key].items() if k not in outputs}


def test_other_models_run_dir_is_refused(suite, baseline, tmp_path):
    from chameleon.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "hf", seed=1)
    before = {p: p.stat().st_mtime_ns for p in baseline.rglob("*")}
    proc = cli("run", suite, "--model", other, "--out", baseline, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a run of another model" in proc.stderr and "Nothing was overwritten" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in baseline.rglob("*")} == before


def test_responses_backend_scored_like_ours(baseline, tmp_path):
    """Our own outputs replayed from a responses file score the same; a missing one is a counted failure."""
    suite = tmp_path / "gsm8k.yaml"
    suite.write_text(SUITE.split("  - {name: gsm8k_maj")[0])
    recs = [json.loads(x) for x in (baseline / "samples/gsm8k.jsonl").read_text().splitlines()]
    rows = {r["request_hashes"][0]: r["output"][0][0] for r in recs}
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"request_hash": h, "output": o}) + "\n" for h, o in rows.items()))
    cli("run", suite, "--backend", "responses", "--model", path, "--out", tmp_path / "r1")
    got = json.loads((tmp_path / "r1/results.json").read_text())["benchmarks"]["gsm8k"]
    want = json.loads((baseline / "results.json").read_text())["benchmarks"]["gsm8k"]
    assert got["metrics"] == want["metrics"] and got["n_failed"] == 0
    path.write_text("".join(json.dumps({"request_hash": h, "output": o}) + "\n" for h, o in list(rows.items())[1:]))
    cli("run", suite, "--backend", "responses", "--model", path, "--out", tmp_path / "r2")
    got = json.loads((tmp_path / "r2/results.json").read_text())["benchmarks"]["gsm8k"]
    assert got["n_items"] == 3 and got["n_failed"] == 1
    failed = [json.loads(x) for x in (tmp_path / "r2/samples/gsm8k.jsonl").read_text().splitlines()
              if json.loads(x)["failed"]]
    assert failed and "no 'output' response" in failed[0]["failure"]


def test_request_hashes_in_the_order_of_the_outputs(baseline, tmp_path):
    """A text record's request_hashes[i] keys output[i] (they were sorted, so an MMLU item's " A".." D"
    hashes came in another order than its log-likelihoods): zipped, they replay the run as a
    responses file that scores the same."""
    suite = tmp_path / "mmlu.yaml"
    suite.write_text(SUITE.split("  - {name: gsm8k,")[0] + "  - {name: mmlu, benchmark: mmlu, shots: 2, limit: 1}\n")
    recs = [json.loads(x) for x in (baseline / "samples/mmlu.jsonl").read_text().splitlines()]
    assert all(len(r["request_hashes"]) == len(r["output"]) == 4 for r in recs)
    lines = [{"request_hash": h, "loglikelihood": out[0][0], "is_greedy": out[0][1]}
             for r in recs for h, out in zip(r["request_hashes"], r["output"])]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli("run", suite, "--backend", "responses", "--model", path, "--out", tmp_path / "r")
    got = json.loads((tmp_path / "r/results.json").read_text())["benchmarks"]["mmlu"]
    want = json.loads((baseline / "results.json").read_text())["benchmarks"]["mmlu"]
    assert got["n_failed"] == 0 and got["metrics"] == want["metrics"]


def test_missing_images_are_reported_not_guessed(tiny_hf, tmp_path):
    from benchmarks.backends import load_backend
    from benchmarks.runner import format_results_table, load_suite, run_suite

    path = tmp_path / "cap.yaml"
    path.write_text("name: cap\nbenchmarks:\n  - {name: coco, benchmark: coco, shots: 0, limit: 6,"
                    " generation: {max_gen_toks: 4}}\n")  # subset: all -> the first 6 Karpathy test items
    images = tmp_path / "images"
    images.mkdir()
    (images / "COCO_val2014_000000199551.jpg").write_bytes((REPO / "benchmarks/data/images/coco/COCO_val2014_000000199551.jpg").read_bytes())
    res = run_suite(load_suite(str(path)), load_backend("chameleon", str(tiny_hf)), tmp_path / "run",
                    images_dirs={"coco": images})
    coco = res["benchmarks"]["coco"]
    assert coco["n_items"] == 6 and coco["n_failed"] == 6 and coco["metrics"] == {}
    recs = [json.loads(x) for x in (tmp_path / "run/samples/coco.jsonl").read_text().splitlines()]
    assert all(r["failed"] and "not found under" in r["failure"] and r["output"] is None for r in recs)
    row = next(line for line in format_results_table(res).splitlines() if line.startswith("coco"))
    assert row.split() == ["coco", "-", "-", "-", "6", "6"]  # nothing scored, 6 failures shown


def test_caption_exemplars_from_a_separate_pool(tiny_hf, tmp_path):
    """Few-shot exemplars from a Karpathy-format train split with its own images directory."""
    from benchmarks.backends import load_backend
    from chameleon.errors import InputError
    from benchmarks.runner import load_suite, run_suite

    captions = {"astronaut.png": "An astronaut in a white spacesuit poses with a helmet.",
                "coffee.png": "A cup of coffee sits on a saucer.",
                "rocket.jpg": "A rocket lifts off from its launch pad."}
    pool = {"images": [{"filename": f, "split": "train", "sentences": [{"raw": c}]} for f, c in captions.items()]
            + [{"filename": "chelsea.png", "split": "test", "sentences": [{"raw": "A cat."}]}]}
    (tmp_path / "dataset_pool.json").write_text(json.dumps(pool))
    skimage = REPO / "benchmarks/data/images/skimage"

    def suite(shots, pool="dataset_pool.json", extra=""):
        path = tmp_path / f"cap{shots}.yaml"
        path.write_text(f"name: cap\nbenchmarks:\n  - {{name: coco, benchmark: coco, shots: {shots}, subset: with_images, limit: 2,"
                        f" generation: {{max_gen_toks: 4}}, exemplars: {tmp_path / pool},"
                        f" exemplar_images: {skimage}{extra}}}\n")
        return load_suite(str(path))

    lm = load_backend("chameleon", str(tiny_hf))
    res = run_suite(suite(2), lm, tmp_path / "run")
    coco = res["benchmarks"]["coco"]
    assert coco["n_scored"] == 2 and coco["prompt"]["exemplar_pool"].endswith("dataset_pool.json (train split)")
    assert coco["config"]["exemplar_split"] is None  # not given: the suite as written
    pool_key = next(k for k in res["data_files"] if k.endswith("dataset_pool.json"))  # hashed like every file read
    assert res["data_files"][pool_key] == hashlib.sha256((tmp_path / "dataset_pool.json").read_bytes()).hexdigest()
    for rec in (json.loads(x) for x in (tmp_path / "run/samples/coco.jsonl").read_text().splitlines()):
        shots, query = rec["images"][:2], rec["images"][2]
        assert all(Path(s["file"]).name in captions for s in shots) and "coco" in query["file"]
        assert sum(c[1:].rstrip(".") in rec["prompt"] for c in captions.values()) == 2 and "a cat" not in rec["prompt"]
    with pytest.raises(InputError, match=r"dataset_pool.json \(train split\) have 3 item.*4-shot"):
        run_suite(suite(4), lm, tmp_path / "run4")
    # A pool without splits (COCO annotations) is used whole, and results.json says so
    coco_pool = {"images": [{"id": i, "file_name": f} for i, f in enumerate(captions)],
                 "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(captions.values())]}
    (tmp_path / "coco_pool.json").write_text(json.dumps(coco_pool))
    res = run_suite(suite(2, "coco_pool.json"), lm, tmp_path / "run_whole")
    assert res["benchmarks"]["coco"]["prompt"]["exemplar_pool"].endswith("coco_pool.json (whole file: it has no splits)")
    with pytest.raises(InputError, match=r"'exemplar_split' 'train' given, but exemplars file .*coco_pool\.json has no splits"):
        run_suite(suite(2, "coco_pool.json", ", exemplar_split: train"), lm, tmp_path / "run_split")
    assert not (tmp_path / "run_split").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbenchmarks:\n  - {name: g, benchmark: gsm8k, exemplars: x.json}\n")
    with pytest.raises(InputError, match="exemplars apply to captioning"):
        load_suite(str(bad))


def _responses_run(tmp_path, name, suite_text, lines):
    from benchmarks.backends import load_backend
    from benchmarks.runner import load_suite, run_suite

    (tmp_path / f"{name}.yaml").write_text(suite_text)
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) or '{"request_hash": "none", "output": ""}\n')
    res = run_suite(load_suite(str(tmp_path / f"{name}.yaml")), load_backend("responses", str(path)),
                    tmp_path / name, progress=False)
    return res, [json.loads(x) for x in (tmp_path / name / "samples/mmlu.jsonl").read_text().splitlines()]


def test_failed_items_score_as_wrong_answers(tmp_path, recwarn):
    """A failed item is wrong: MMLU's four tied -inf placeholders used to pick A, so items whose gold
    is A scored 1. With half the items missing, every metric (value, stderr, CI, micro and macro)
    equals that of a run where those items are answered wrong."""
    from benchmarks.backends.base import request_hash

    suite = "name: f\nbenchmarks:\n  - {name: mmlu, benchmark: mmlu, shots: 0, limit: 2}\n"
    res, recs = _responses_run(tmp_path, "none", suite, [])  # nothing answered: all 114 items fail
    mmlu = res["benchmarks"]["mmlu"]
    assert mmlu["n_failed"] == mmlu["n_items"] == 114 and any(r["doc"]["answer"] == 0 for r in recs)
    assert all(r["failed"] and r["score"] == {"acc": 0.0} for r in recs)
    assert all(m["value"] == 0 for m in mmlu["metrics"].values())
    assert not [w for w in recwarn if "invalid value" in str(w.message)]  # numpy's, on the -inf placeholders

    def answers(rec, right):  # log-likelihoods of " A".." D" that make the item right or wrong
        gold = rec["doc"]["answer"]
        for i, letter in enumerate("ABCD"):
            h = request_hash("loglikelihood", (rec["prompt"], f" {letter}"))
            assert h in rec["request_hashes"]
            yield {"request_hash": h, "loglikelihood": -1.0 if (i == gold) == right else -5.0}

    right = [x for r in recs[::2] for x in answers(r, True)]
    partial, got = _responses_run(tmp_path, "partial", suite, right)  # every other item missing
    wrong = [x for r in recs[1::2] for x in answers(r, False)]
    full, want = _responses_run(tmp_path, "full", suite, right + wrong)  # ... answered wrong instead
    assert partial["benchmarks"]["mmlu"]["n_failed"] == 57 and full["benchmarks"]["mmlu"]["n_failed"] == 0
    assert [r["score"] for r in got] == [r["score"] for r in want]
    assert [r["failed"] for r in got] == [i % 2 == 1 for i in range(len(got))]
    assert partial["benchmarks"]["mmlu"]["metrics"] == full["benchmarks"]["mmlu"]["metrics"]  # same sums, same order
    acc = full["benchmarks"]["mmlu"]["metrics"]["chameleon_mmlu/acc,none"]
    assert acc["value"] == 0.5 and acc["ci95"] is not None


SMALL = """\
name: small
backend: chameleon
seed: 7
batch_size: 4
benchmarks:
  - {name: gsm8k, benchmark: gsm8k, shots: 1, limit: 2, generation: {max_gen_toks: 4}}
  - {name: coco, benchmark: coco, shots: 0, subset: with_images, limit: 2, generation: {max_gen_toks: 4}}
"""
PEER_FAILED = "another process of this torchrun job stopped ("


def torchrun_failing(*args) -> subprocess.CompletedProcess:
    """A 2-process run that one process fails: every process ends within a minute (gloo's own
    timeout is 30), the others with a one-line error instead of a traceback."""
    torchrun = Path(sys.executable).with_name("torchrun")
    started = time.monotonic()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "benchmarks.cli", "run",
                           *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - started < 60
    assert not re.search(r"\[rank\d\]: Traceback", proc.stderr), proc.stderr[-3000:]  # only torchrun's own
    # 2: an InputError, the failing process's and the others' unless torchrun's SIGTERM (-15) came
    # first; never 1, an uncaught exception. Once in ~15 runs a process aborted (-6) in gloo's
    # teardown at exit after printing its error, as its peer went at the same moment
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert codes and set(codes) <= {"2", "-15", "-6"}, codes
    proc.both_exited_2 = codes.count("2") == 2
    return proc


def torchrun_run(*args) -> dict:
    cli("--standalone", "--nproc-per-node", "2", "-m", "benchmarks.cli", "run", *args,
        prefix=(str(Path(sys.executable).with_name("torchrun")),))
    return json.loads((Path(args[args.index("--out") + 1]) / "results.json").read_text())


def test_torchrun_one_process_damaged_cache_file(tiny_hf, tmp_path):
    """Only rank 1's cache file cannot be opened (a symlink to a vanished disk): its error names the
    file (the symlink used to escape the --out check and give a traceback) and the run ends."""
    (tmp_path / "small.yaml").write_text(SMALL)
    out = tmp_path / "run"
    cli("run", tmp_path / "small.yaml", "--model", tiny_hf, "--out", out)
    (out / "cache/rank1.jsonl").symlink_to(tmp_path / "gone/rank1.jsonl")
    proc = torchrun_failing(tmp_path / "small.yaml", "--model", tiny_hf, "--out", out)
    assert f"error: --out {out}: cannot read or write {out}/cache/rank1.jsonl (No such file or directory)" in proc.stderr
    if proc.both_exited_2:  # rank 0 reached its next collective before torchrun stopped it
        assert PEER_FAILED in proc.stderr, proc.stderr[-3000:]
    (out / "cache/rank1.jsonl").unlink()
    res = torchrun_run(tmp_path / "small.yaml", "--model", tiny_hf, "--out", out)
    assert res["complete"] and all(b["computed_requests"] == 0 for b in res["benchmarks"].values())


def gloo_pair(argvs: list[list]) -> tuple[list[subprocess.Popen], list[str]]:
    """Two processes of one gloo group, started as torchrun starts them but without torchrun (whose
    SIGTERM would race the outcome), each with its own CLI arguments; returns them and their stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.cli", *map(str, argv)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r, argv in enumerate(argvs)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:  # (a hang fails the test; it must not leave the processes behind)
        for p in procs:
            p.kill()
    return procs, errors


def test_one_process_failing_stops_the_other_with_a_short_error(tiny_hf, tmp_path):
    """Two processes of one gloo group, started as torchrun starts them but without torchrun, whose
    SIGTERM races the outcome: rank 1 fails on its cache file; rank 0, at its next collective,
    stops with a one-line error quoting gloo (exit 2, no traceback) instead of gloo's traceback."""
    (tmp_path / "small.yaml").write_text(SMALL)
    out = tmp_path / "run"
    cli("run", tmp_path / "small.yaml", "--model", tiny_hf, "--out", out)
    (out / "cache/rank1.jsonl").symlink_to(tmp_path / "gone/rank1.jsonl")
    procs, errors = gloo_pair([["run", tmp_path / "small.yaml", "--model", tiny_hf, "--out", out]] * 2)
    # -6: once in a while gloo aborts in its teardown at exit, after the error was printed
    assert all(p.returncode in (2, -6) for p in procs), ([p.returncode for p in procs], errors)
    assert f"error: --out {out}: cannot read or write {out}/cache/rank1.jsonl (No such file or directory)" in errors[1]
    assert f"error: --out {out}: {PEER_FAILED}" in errors[0] and "Traceback" not in errors[0], errors[0]


def test_torchrun_bad_image_after_a_benchmark(tiny_hf, tmp_path):
    """A captioning image whose pixels are cut, found once the first benchmark is done: the
    process whose share of the images holds it meets it when hashing them, before the model runs
    on captioning; every process names the file and keeps its finished requests."""
    (tmp_path / "small.yaml").write_text(SMALL)
    images = tmp_path / "coco"
    images.mkdir()
    shipped = REPO / "benchmarks/data/images/coco"
    for f in shipped.glob("*.jpg"):
        (images / f.name).write_bytes(f.read_bytes())
    bad = images / "COCO_val2014_000000199764.jpg"  # the 2nd item
    bad.write_bytes(bad.read_bytes()[:3000])  # its header passes the check before the run; its pixels are cut
    run = ("--model", tiny_hf, "--out", tmp_path / "run", "--images-dir", f"coco={images}")
    proc = torchrun_failing(tmp_path / "small.yaml", *run)
    assert f"error: {bad}: image is truncated or corrupt" in proc.stderr
    cache = tmp_path / "run/cache"
    assert all((cache / f"rank{r}.jsonl").read_text().count("\n") >= 1 for r in (0, 1))  # gsm8k, both shares
    (images / "COCO_val2014_000000199764.jpg").write_bytes((shipped / "COCO_val2014_000000199764.jpg").read_bytes())
    res = torchrun_run(tmp_path / "small.yaml", *run)
    assert res["complete"] and res["benchmarks"]["gsm8k"]["computed_requests"] == 0  # kept, not recomputed


def test_captioning_reads_images_when_needed_and_encodes_each_once(tiny_hf, tmp_path, monkeypatch):
    """Captioning prompts hold FileImages, not decoded photos (a COCO run held ~1.1 MB per photo per
    process); each file is VQ-encoded once however many prompts show it; request hashes are
    lm-eval's `hash_args` of the decoded images."""
    from lm_eval.api.model import hash_args

    from benchmarks.backends import load_backend
    from benchmarks.backends.base import FileImage
    from benchmarks.runner import load_suite, run_suite

    path = tmp_path / "cap.yaml"
    path.write_text("name: cap\nbenchmarks:\n  - {name: coco, benchmark: coco, shots: 2, subset: with_images, limit: 4,"
                    " generation: {max_gen_toks: 3}}\n")
    lm = load_backend("chameleon", str(tiny_hf))
    encoded, requests = [], []
    real_encode, real_generate = lm.model.encode_image, lm.generate_until
    monkeypatch.setattr(lm.model, "encode_image", lambda image: encoded.append(image) or real_encode(image))
    monkeypatch.setattr(lm, "generate_until", lambda reqs, **kw: requests.extend(reqs) or real_generate(reqs, **kw))
    lm.batch_size = 2
    run_suite(load_suite(str(path)), lm, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run/samples/coco.jsonl").read_text().splitlines()]
    shown = [f["file"] for r in recs for f in r["images"]]
    assert len(recs) == 4 and len(shown) == 12 and len(encoded) == len(set(shown)) < 12
    for rec, req in zip(recs, requests):
        context, gen_kwargs, aux = req.args
        assert all(isinstance(image, FileImage) for image in aux["visual"])
        assert rec["request_hash"] == hash_args("generate_until", (context, gen_kwargs, {"visual": [im.read() for im in aux["visual"]]}))


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tiny_hf, tmp_path):
    """The same command started twice: the second computed every request again, appended each to the
    first's cache file a second time and raced it on results.json's temporary file. It is refused,
    naming --out, and writes nothing; the first (held stopped meanwhile) runs on and finishes, and
    once it has ended the command resumes as usual."""
    (tmp_path / "small.yaml").write_text(SMALL)
    out = tmp_path / "run"
    args = ["run", str(tmp_path / "small.yaml"), "--model", str(tiny_hf), "--out", str(out), "--chunk-size", "1"]
    first = subprocess.Popen([sys.executable, "-m", "benchmarks.cli", *args], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = out / "cache" / "rank0.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not cache.exists() or cache.read_bytes().count(b"\n") < 1):
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # mid-run, its lock held
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        second = cli(*args, check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"error: --out {out}: another chameleon-bench run is writing to it now" in second.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4  # each request once
    cli(*args)
    assert all(b["computed_requests"] == 0 for b in json.loads((out / "results.json").read_text())["benchmarks"].values())


def test_duplicate_items_get_keys_of_their_own(tiny_hf, baseline, tmp_path):
    """A dataset may hold the same item twice (the full MMLU test set: 27 questions within their
    subject): each occurrence gets its own item_hash (the first keeps the plain one, the next ones
    count their occurrence), so that two runs still join one to one on SCHEMA.md's key."""
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    rows = (REPO / "benchmarks/data/gsm8k/test.jsonl").read_text().splitlines()
    (data / "gsm8k" / "test.jsonl").write_text("\n".join([rows[0], rows[1], rows[0], rows[0], *rows[2:]]) + "\n")
    suite = tmp_path / "dup.yaml"
    suite.write_text("name: dup\nbackend: chameleon\nseed: 7\nbatch_size: 4\nbenchmarks:\n"
                     "  - {name: gsm8k, benchmark: gsm8k, shots: 2, limit: 4, generation: {max_gen_toks: 10}}\n")
    cli("run", suite, "--model", tiny_hf, "--out", tmp_path / "run", "--data-dir", data)
    recs = [json.loads(line) for line in (tmp_path / "run/samples/gsm8k.jsonl").read_text().splitlines()]
    keys = [(r["item_hash"], r["filter"]) for r in recs]
    assert len(recs) == 8 and len(set(keys)) == len(keys)  # 4 items x 2 filters, each key once
    by_doc = {}
    for r in recs:
        by_doc.setdefault(r["item_id"], set()).add(r["item_hash"])
    assert all(len(hashes) == 1 for hashes in by_doc.values())  # one key per item, whatever the filter
    # The first occurrence keeps the plain content hash: the same key as in a run without duplicates.
    plain = {r["item_hash"] for r in map(json.loads, (baseline / "samples/gsm8k.jsonl").read_text().splitlines())
             if r["item_id"].endswith("/0")}
    assert by_doc[f"{recs[0]['item_id'].rsplit('/', 1)[0]}/0"] == plain


def test_interrupted_rerun_keeps_the_results_it_had(tiny_hf, tmp_path, monkeypatch):
    """A finished run rerun into its directory (the same command), ^C during its second benchmark:
    results.json was rewritten after the first with that benchmark alone, so the entries of the
    later ones were gone though their samples files and cached requests were not. It keeps every
    entry it had (complete false until the rerun ends), each still matching its samples file, and
    the next rerun finishes with the results of the first run."""
    from benchmarks.backends import load_backend
    from benchmarks.runner import format_results_table, load_suite, run_suite
    from benchmarks.runner import run as run_module

    (tmp_path / "s.yaml").write_text(SMALL + "  - {name: gsm8k0, benchmark: gsm8k, shots: 0, limit: 1,"
                                             " generation: {max_gen_toks: 4}}\n")
    suite, lm, out = load_suite(str(tmp_path / "s.yaml")), load_backend("chameleon", str(tiny_hf)), tmp_path / "run"

    def results():
        return json.loads((out / "results.json").read_text())

    def as_run(res):  # what does not depend on the invocation that ran a benchmark
        return {n: {k: v for k, v in b.items() if k not in ("seconds", "computed_requests")}
                for n, b in res["benchmarks"].items()}, res["data_files"]

    first = run_suite(suite, lm, out, progress=False)
    assert first["complete"] and list(first["benchmarks"]) == ["gsm8k", "coco", "gsm8k0"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # ^C in the middle of captioning

    monkeypatch.setattr(run_module, "run_captioning", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, lm, out, progress=False)
    kept = results()
    assert list(kept["benchmarks"]) == ["gsm8k", "coco", "gsm8k0"], list(kept["benchmarks"])
    assert not kept["complete"] and as_run(kept) == as_run(first)
    assert kept["benchmarks"]["coco"]["seconds"] == first["benchmarks"]["coco"]["seconds"]  # the first run's entry
    for b in kept["benchmarks"].values():
        assert hashlib.sha256((out / b["samples_file"]).read_bytes()).hexdigest() == b["samples_sha256"]
    table = format_results_table(out / "results.json")
    assert "(INCOMPLETE)" in table and {line.split()[0] for line in table.splitlines()[3:]} == {"gsm8k", "coco", "gsm8k0"}
    # A samples file that is no longer the one its entry names (as a rerun killed between writing
    # samples/gsm8k.jsonl and results.json would leave it): that entry is not kept; the order stays
    for name in ("gsm8k", "gsm8k0"):
        with open(out / f"samples/{name}.jsonl", "a") as f:
            f.write("{}\n")
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, lm, out, progress=False)
    assert list(results()["benchmarks"]) == ["gsm8k", "coco"]  # gsm8k rerun, gsm8k0 dropped
    monkeypatch.undo()
    done = run_suite(suite, lm, out, progress=False)
    assert done["complete"] and as_run(done) == as_run(first) and as_run(results()) == as_run(first)
    assert list(done["benchmarks"]) == list(first["benchmarks"]) and list(done["data_files"]) == list(first["data_files"])
    assert all(b["computed_requests"] == 0 for b in done["benchmarks"].values())


def test_processes_that_loaded_different_models_are_refused(tiny_hf, tmp_path):
    """Every process of a torchrun job must run the same model: a hub branch that moves while they
    start, or a checkpoint rewritten under them, would otherwise mix two models' outputs in one run
    (only the main process's is recorded). Each process stops with an error naming both
    fingerprints, before anything is written."""
    from chameleon.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "hf", seed=1)
    (tmp_path / "small.yaml").write_text(SMALL)
    out = tmp_path / "run"
    procs, errors = gloo_pair([["run", tmp_path / "small.yaml", "--model", model, "--out", out] for model in (tiny_hf, other)])
    assert all(p.returncode in (2, -6) for p in procs), ([p.returncode for p in procs], errors)
    for err in errors:
        assert "error: --model: the processes of this job loaded different models (fingerprints " in err and "Traceback" not in err, err
    assert not out.exists()
