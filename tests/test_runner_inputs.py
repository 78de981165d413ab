"""Bad input to the runner: InputError naming file/key/flag, CLI exit 2 without traceback; the
record store's tolerance of a torn last line; the results table."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runner.results import format_results_table, mean_entry
from benchmarks.runner.store import RecordStore
from benchmarks.runner.suite import load_suite
from chameleon.errors import InputError
from conftest import REPO

GOOD = "name: t\nbenchmarks:\n  - {name: m, benchmark: mmlu, shots: 5}\n"


def suite_file(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_shipped_suites_load():
    paper = load_suite("paper")
    assert {b.name for b in paper.benchmarks} >= {"gsm8k_maj1", "gsm8k_maj8", "math_maj4", "mmlu", "coco", "flickr30k"}
    assert next(b for b in paper.benchmarks if b.name == "gsm8k_maj8").k == 8
    assert all(b.limit for b in load_suite("smoke").benchmarks if b.kind == "text")


@pytest.mark.parametrize("text, match", [
    (GOOD.replace("shots", "shot"), r"s\.yaml: benchmarks\[0\] \('m'\): unknown key 'shot'; did you mean 'shots'\? \(allowed: .*limit"),
    ("name: t\nbenchmark: []\n", r"s\.yaml: unknown key 'benchmark'; did you mean 'benchmarks'\?"),
    (GOOD.replace("shots: 5", "shots: five"), r"s\.yaml: benchmarks\[0\] \('m'\): 'shots' must be an integer >= 0, got 'five'"),
    (GOOD.replace("mmlu, shots: 5", "gsm8k, k: 4"), r"benchmark 'm': k=4 samples need generation.do_sample"),
    (GOOD.replace("shots: 5", "generation: {temprature: 0.6}"), r"generation: unknown key 'temprature'; did you mean 'temperature'"),
    (GOOD.replace("mmlu, shots: 5", "mmlu, subset: all"), r"apply to captioning"),
    (GOOD + "  - {name: m, benchmark: gsm8k}\n", r"benchmark 'm': duplicate name"),
    ("name: t\nbenchmarks: [\n", r"s\.yaml: not valid YAML"),
    # values in range, each reported with the file, the benchmark and the key
    (GOOD + "batch_size: 0\n", r"s\.yaml: 'batch_size' must be an integer >= 1, got 0"),
    (GOOD + "batch_size: -3\n", r"s\.yaml: 'batch_size' must be an integer >= 1, got -3"),
    (GOOD + "seed: -1\n", r"s\.yaml: 'seed' must be an integer in 0\.\.4294967295 .*, got -1"),
    (GOOD + "seed: 4294967296\n", r"s\.yaml: 'seed' must be an integer in 0\.\.4294967295 \(numpy's seed range"),
    (GOOD.replace("mmlu, shots: 5", "coco, metrics: []"), r"'metrics' must be a non-empty list of metric names \(left out: CIDEr alone\), got \[\]"),
    (GOOD.replace("mmlu, shots: 5", "coco, shots: 0, exemplars: pool.json"), r"benchmark 'm': 'exemplars' \(a few-shot pool\) needs 'shots' >= 1"),
    (GOOD + "backend: chamelon\n", r"s\.yaml: 'backend' must be one of chameleon, hf, responses, got 'chamelon'"),
    (GOOD.replace("shots: 5", "limit: -1"), r"s\.yaml: benchmarks\[0\] \('m'\): 'limit' must be an integer >= 1, or null for all items, got -1"),
    (GOOD.replace("shots: 5", "limit: true"), r"s\.yaml: benchmarks\[0\] \('m'\): 'limit' must be an integer >= 1, or null for all items, got True"),
    (GOOD.replace("shots: 5", "shots: -2"), r"benchmarks\[0\] \('m'\): 'shots' must be an integer >= 0, got -2"),
    (GOOD.replace("shots: 5", "shots: 6"), r"benchmark 'm': 'shots' must be 0\.\.5 for mmlu, got 6"),
    (GOOD.replace("mmlu, shots: 5", "mmlu, k: 2, generation: {do_sample: true, temperature: 1}"),
     r"benchmark 'm': mmlu is scored by log-likelihood; 'k' must be 1"),
    (GOOD.replace("mmlu, shots: 5", "gsm8k, maj_at: [1]"), r"benchmark 'm': 'maj_at' needs k > 1"),
    (GOOD.replace("mmlu, shots: 5", "coco, k: 2"), r"benchmark 'm': k and maj_at apply to text benchmarks only"),
    (GOOD.replace("mmlu, shots: 5", "coco, metrics: [CIDEr, Bleu5]"), r"benchmark 'm': 'metrics': unknown caption metric 'Bleu5'"),
    (GOOD.replace("mmlu", "mmlu2"), r"s\.yaml: benchmark 'm': unknown benchmark 'mmlu2'; did you mean 'mmlu'\?"),
    (GOOD.replace("shots: 5", "generation: {max_gen_toks: -1}"), r"benchmark 'm' generation: 'max_gen_toks' must be an integer >= 1, got -1"),
    (GOOD.replace("shots: 5", "generation: {top_k: -1}"), r"benchmark 'm' generation: 'top_k' must be an integer >= 0"),
    (GOOD.replace("shots: 5", "generation: {top_p: 0}"), r"benchmark 'm' generation: 'top_p' must be a number in \(0, 1\], got 0"),
    (GOOD.replace("shots: 5", "generation: {top_p: 1.5}"), r"'top_p' must be a number in \(0, 1\], got 1\.5"),
    (GOOD.replace("shots: 5", "generation: {temperature: -0.5}"), r"generation: 'temperature' must be a finite number >= 0"),
    (GOOD.replace("shots: 5", "generation: {temperature: .nan}"), r"generation: 'temperature' must be a finite number >= 0"),
    (GOOD.replace("shots: 5", "generation: {until: ['Q:', '']}"), r"s\.yaml: benchmark 'm' generation: 'until' must be a list of non-empty strings"),
    (GOOD.replace("shots: 5", "generation: {until: [3]}"), r"'until' must be a list of non-empty strings, got \[3\]"),
    (GOOD.replace("shots: 5", "generation: {seed: -1}"), r"benchmark 'm' generation: 'seed' must be an integer in 0\.\.4294967295"),
    (GOOD.replace("shots: 5", "generation: {seed: '5'}"), r"generation: 'seed' must be an integer in 0\.\.4294967295 .*, got '5'"),
    # wrong types are named in YAML's words, with the range, the file and the entry (index and name)
    (GOOD.replace("shots: 5", "limit: '3'"), r"s\.yaml: benchmarks\[0\] \('m'\): 'limit' must be an integer >= 1, or null for all items, got '3'"),
    (GOOD.replace("shots: 5", "limit: 1.5"), r"'limit' must be an integer >= 1, or null for all items, got 1\.5"),
    (GOOD.replace("shots: 5", "generation: [1]"), r"benchmarks\[0\] \('m'\): 'generation' must be a mapping, got \[1\]"),
    (GOOD.replace("shots: 5", "generation: {do_sample: 'yes'}"), r"'do_sample' must be true or false, got 'yes'"),
    (GOOD.replace("shots: 5", "description: 5"), r"'description' must be a string, got 5"),
    ("name: t\nbenchmarks:\n  - {name: 5, benchmark: mmlu}\n", r"s\.yaml: benchmarks\[0\]: 'name' must be a string, got 5"),
    # the few-shot pool's keys without a pool would be ignored
    (GOOD.replace("mmlu, shots: 5", "coco, exemplar_images: /data/coco/train2014"),
     r"benchmark 'm': exemplar_images apply only with 'exemplars'"),
    # names become file names: no paths
    (GOOD.replace("name: m", "name: ../../escaped"), r"benchmarks\[0\] \('\.\./\.\./escaped'\): 'name' must be 1-100 characters .*got '\.\./\.\./escaped'"),
    (GOOD.replace("name: m", "name: a/b"), r"benchmarks\[0\] \('a/b'\): 'name' must be .*got 'a/b'"),
    (GOOD + "  - {name: M, benchmark: gsm8k}\n", r"benchmark 'M': duplicate name"),
    # a key given twice is not last-wins
    (GOOD.replace("shots: 5", "shots: 5, shots: 1"), r"s\.yaml: not valid YAML \(line 3, column 42: found duplicate key 'shots'\)"),
    ("name: t\nseed: 1\nseed: 2\n" + GOOD.split("\n", 1)[1], r"found duplicate key 'seed'"),
])
def test_suite_validation(tmp_path, text, match):
    with pytest.raises(InputError, match=match):
        load_suite(str(suite_file(tmp_path, text)))


def test_generation_seed_draws_other_samples(tmp_path, tiny_hf):
    """The suite's `seed` seeds lm-eval and the caption exemplars; maj@k samples come from
    generation.seed (default 0), which a suite could not set: every maj@k rerun drew the same k."""
    from benchmarks.backends import load_backend
    from benchmarks.runner.run import run_suite

    backend = load_backend("chameleon", str(tiny_hf), batch_size=4, device="cpu", dtype="float32")
    outputs = {}
    for name, extra in (("a", ""), ("b", "seed: 99\n"), ("c", "")):
        seed = ", seed: 5" if name == "c" else ""
        suite = load_suite(str(suite_file(tmp_path, f"name: t\n{extra}benchmarks:\n  - {{name: g, benchmark: gsm8k, "
                                                    f"k: 2, limit: 1, generation: {{max_gen_toks: 6, do_sample: true, "
                                                    f"temperature: 1.0{seed}}}}}\n")))
        run_suite(suite, backend, tmp_path / name, progress=False)
        outputs[name] = json.loads((tmp_path / name / "samples/g.jsonl").read_text().splitlines()[0])["output"]
    assert outputs["a"] == outputs["b"] != outputs["c"]


def test_unknown_suite_name(tmp_path):
    with pytest.raises(InputError, match=r"suite 'papr': not a shipped suite \(paper, smoke\)"):
        load_suite("papr")
    with pytest.raises(InputError, match=r"suite .*: a directory; expected a suite YAML file"):
        load_suite(str(tmp_path))


@pytest.mark.parametrize("extra, match", [
    (["--images-dir", "cocoo=/tmp"], r"--images-dir 'cocoo=/tmp': expected DATASET=DIR with DATASET one of coco, flickr30k"),
    (["--limit", "0"], r"--limit must be >= 1"),
    (["--backend", "hf"], r"config.json"),
    (["--images-dir", "coco="], r"--images-dir 'coco=': expected DATASET=DIR .* and DIR a directory"),
    (["--data-dir", "missing"], r"--data-dir '.*missing' is not a directory"),
    (["--data-dir", "."], r"expected 'gsm8k/test\.jsonl' under --data-dir '"),
    (["--dtype", "float64"], r"--dtype 'float64': expected one of float32, fp32, bfloat16, bf16, float16, fp16"),
    (["--device", "meta"], r"--device 'meta': holds no data; expected a device to run on"),
    (["--device", "nonsense"], r"--device 'nonsense': not a torch device"),
    (["--device", "mps"], r"--device 'mps': not available in this torch build or on this machine"),
    (["--data-dir", ""], r"--data-dir: empty path"),
    (["--data-dir", "data"], r"gsm8k/test\.jsonl: line 2: not UTF-8 text \(byte 0xff\)"),
    (["--data-dir", "data", "--out", "afile/sub"], r"--out .*afile/sub: .*afile is a file, not a directory"),
    (["--data-dir", "dirs"], r"test file '.*dirs/gsm8k/test\.jsonl' is a directory; expected 'gsm8k/test\.jsonl' under "
                             r"--data-dir '.*dirs' to be a JSON Lines file \(one JSON object per line\)"),
])
def test_cli_bad_input_exits_2(tmp_path, extra, match):
    suite = suite_file(tmp_path, GOOD.replace("mmlu, shots: 5", "gsm8k, shots: 1"))
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    (tmp_path / "afile").write_text("")
    (tmp_path / "dirs" / "gsm8k" / "test.jsonl").mkdir(parents=True)
    proc = run_cli(tmp_path, "run", suite, "--model", tmp_path, "--out", tmp_path / "out", *extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert re.search(match, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / "afile").read_text() == ""


def test_run_refuses_empty_arguments(tmp_path, capsys, monkeypatch):
    """An empty SUITE, --model or --out (an unset shell variable) is an error naming it, not the
    current directory ('.: not a checkpoint directory', '--out .: exists and is not an empty
    directory', 'suite : a directory')."""
    from benchmarks.cli import main

    monkeypatch.chdir(tmp_path)
    suite = str(suite_file(tmp_path, GOOD))
    for argv, message in (([suite, "--model", str(tmp_path), "--out", ""], "error: --out: empty path\n"),
                          ([suite, "--model", "", "--out", "o"], "error: --model: empty path\n"),
                          (["", "--model", str(tmp_path), "--out", "o"],
                           "error: suite '': empty; expected a shipped suite (paper, smoke) or a YAML file\n")):
        assert main(["run", *argv]) == 2
        assert capsys.readouterr().err == message
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_suite_that_is_not_text_is_a_one_line_error(tmp_path):
    """A binary file given as the suite: PyYAML's reader error spans lines; the error is one."""
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(InputError) as err:
        load_suite(str(path))
    assert re.fullmatch(r".*s\.yaml: not valid YAML \(.*#x0089.*\)", str(err.value)), str(err.value)


def test_limit_help_says_it_counts_per_subject():
    """--limit is lm-eval's, per task: `--limit 2` runs 114 MMLU items and 14 of the full MATH, not
    2 per benchmark as its help said."""
    from benchmarks.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["run"]
    text = " ".join(next(a for a in sub._actions if a.dest == "limit").help.split())
    assert "MMLU gets N per subject (57 N items)" in text and "math (the full MATH) N per subject (7 N)" in text


def test_run_takes_every_dtype_name(tmp_path, monkeypatch):
    """run, generate and convert share one --dtype parser; the backends get torch's name."""
    from benchmarks.cli import main

    got = []

    def load_backend(kind, model, **kwargs):
        got.append(kwargs["dtype"])
        raise InputError("stop before loading")

    monkeypatch.setattr(importlib.import_module("benchmarks.backends"), "load_backend", load_backend)
    suite = suite_file(tmp_path, GOOD.replace("mmlu, shots: 5", "gsm8k, shots: 1"))
    for name in ("bf16", "bfloat16", "fp16", "float32"):
        assert main(["run", str(suite), "--model", str(tmp_path), "--out", str(tmp_path / "out"), "--dtype", name]) == 2
    assert got == ["bfloat16", "bfloat16", "float16", "float32"]


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "benchmarks.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                          "PATH": "/usr/bin:/bin"})


def test_cli_typo_in_suite_exits_2(tmp_path):
    suite = suite_file(tmp_path, GOOD.replace("shots", "shot"))
    proc = run_cli(REPO, "run", suite, "--model", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "did you mean 'shots'" in proc.stderr and "Traceback" not in proc.stderr


def test_run_dir_belongs_to_one_suite_and_settings(tmp_path):
    """Another suite or --limit into a finished run's --out is refused with nothing changed, naming
    what differs (of another suite: its file, settings and benchmarks, not only two hashes); the
    same command resumes (responses backend: no model to load)."""
    one = "name: t\nbackend: responses\nbenchmarks:\n  - {name: g, benchmark: gsm8k, shots: 0, limit: 1}\n"
    suite_a, suite_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    suite_a.write_text(one)
    suite_b.write_text(one.replace("limit: 1", "limit: 2, generation: {max_gen_toks: 8}").replace("name: t", "name: t\nseed: 3")
                       + "  - {name: m, benchmark: mmlu, limit: 1}\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"request_hash": "x", "output": "The answer is 1."}\n')
    out = tmp_path / "run"
    assert run_cli(REPO, "run", suite_a, "--model", responses, "--out", out).returncode == 0
    assert json.loads((out / "run.json").read_text())["suite"]["benchmarks"][0]["limit"] == 1
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for other, diff in (([suite_b], f"(suite path '{suite_a}' there, '{suite_b}' now; suite seed 0 there, 3 now; "
                                    "benchmark 'm' now, not there; benchmark 'g' limit 1 there, 2 now; "
                                    "benchmark 'g' generation.max_gen_toks unset there, 8 now)"),
                        ([suite_a, "--limit", "1"], "(limit unset there, 1 now)"),
                        ([suite_a], "(suite file text (sha256 ")):
        if other == [suite_a]:  # its own file, edited in comments only: still another suite file
            suite_a.write_text("# the same settings\n" + one)
        proc = run_cli(REPO, "run", *other, "--model", responses, "--out", out)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "holds a run of another suite or settings" in proc.stderr and diff in proc.stderr, proc.stderr
        assert "Nothing was overwritten" in proc.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    suite_a.write_text(one)
    proc = run_cli(REPO, "run", suite_a, "--model", responses, "--out", out, "--batch-size", "3", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr  # batch size does not change results: resumed
    # (no model runs; fp32 is the default dtype by another name: nothing to warn about)
    assert "warning: --batch-size has no effect with backend responses" in proc.stderr, proc.stderr
    assert json.loads((out / "results.json").read_text())["complete"]


def test_out_holding_only_a_half_written_manifest_is_claimed(tmp_path):
    """A fresh run killed while writing run.json leaves run.json.tmp alone (nothing computed yet):
    rerunning the command claims the directory instead of refusing it as not empty."""
    suite = tmp_path / "s.yaml"
    suite.write_text("name: t\nbackend: responses\nbenchmarks:\n  - {name: g, benchmark: gsm8k, shots: 0, limit: 1}\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"request_hash": "x", "output": "The answer is 1."}\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json.tmp").write_text('{"schema_version": 1, "mod')
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["complete"] and not (out / "run.json.tmp").exists()
    other = tmp_path / "other"  # anything else in it still makes it another directory
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", other)
    assert proc.returncode == 2 and "exists and is not an empty directory or a chameleon-bench run" in proc.stderr


MODEL = {"backend": "chameleon", "fingerprint": "f" * 64, "dtype": "torch.float32"}


def test_run_identity_records_inputs_as_they_take_effect(tmp_path, monkeypatch):
    """Shipped data and images given explicitly are the defaults; an --images-dir for a dataset the
    suite lacks changes nothing; relative suite paths are resolved (another cwd reads other files)."""
    from benchmarks.runner.captioning import DEFAULT_IMAGES
    from benchmarks.runner.run import run_identity
    from benchmarks.text.data import SHIPPED_DATA_DIR

    suite = load_suite(str(suite_file(tmp_path, "name: s\nbenchmarks:\n  - {name: g, benchmark: gsm8k}\n"
                                                 "  - {name: c, benchmark: coco, references: refs.json}\n")))
    implicit = run_identity(suite, MODEL)
    assert implicit == run_identity(suite, MODEL, data_dir=SHIPPED_DATA_DIR, images_dirs={"coco": DEFAULT_IMAGES["coco"],
                                                                                          "flickr30k": tmp_path})
    assert implicit["images_dirs"] == {"coco": None} and implicit["data_dir"] is None
    assert run_identity(suite, MODEL, data_dir="")["data_dir"] is None  # "" reads the shipped data too
    local = run_identity(suite, MODEL, data_dir="coco_karpathy_test")["data_dir"]  # a directory, not a shipped set
    assert local == str(Path("coco_karpathy_test").resolve())
    assert run_identity(suite, MODEL, images_dirs={"coco": tmp_path})["images_dirs"] == {"coco": str(tmp_path.resolve())}
    monkeypatch.chdir(tmp_path)
    assert run_identity(suite, MODEL)["caption_files"] == {"c": [str(tmp_path.resolve() / "refs.json"), None, None]}


def test_yaml_merge_keys_and_free_names(tmp_path):
    text = "name: s\nbenchmarks:\n  - &d {name: a, benchmark: gsm8k, shots: 0, limit: 2}\n  - {<<: *d, name: 'gsm8k@8 (0-shot)', limit: 1}\n"
    spec = load_suite(str(suite_file(tmp_path, text))).benchmarks[1]
    assert (spec.name, spec.benchmark, spec.shots, spec.limit) == ("gsm8k@8 (0-shot)", "gsm8k", 0, 1)
    # A merge source that merges itself: its override is not a duplicate.
    chained = "name: s\nbenchmarks:\n  - &a {name: a, benchmark: gsm8k, limit: 2}\n  - &b {<<: *a, name: b}\n  - {<<: *b, name: c}\n"
    assert [s.name for s in load_suite(str(suite_file(tmp_path, chained))).benchmarks] == ["a", "b", "c"]
    with pytest.raises(InputError, match="200 bytes"):
        load_suite(str(suite_file(tmp_path, text.replace("gsm8k@8 (0-shot)", "名" * 90))))


def test_claim_run_dir_identity_and_old_manifests(tmp_path):
    from benchmarks.runner.dist import Dist
    from benchmarks.runner.run import claim_run_dir

    ident = {"suite_sha256": "a" * 64, "limit": None, "dtype": "torch.float32", "data_dir": None, "images_dirs": {}}
    out = tmp_path / "run"
    claim_run_dir(out, MODEL, Dist(), ident)
    assert json.loads((out / "run.json").read_text())["identity"] == ident
    claim_run_dir(out, MODEL, Dist(), ident)  # resume
    with pytest.raises(InputError, match=r"another suite or settings \(limit unset there, 5 now\)"):
        claim_run_dir(out, MODEL, Dist(), {**ident, "limit": 5})
    # run.json of an earlier version (no identity): checked against its results.json, then adopted
    legacy = {"schema_version": 1, "model": MODEL, "created_at": "then"}
    (out / "run.json").write_text(json.dumps(legacy))
    (out / "results.json").write_text(json.dumps({"suite": {"sha256": "b" * 64}, "overrides": {"limit": None},
                                                  "model": MODEL}))
    with pytest.raises(InputError, match=r"suite_sha256 'b{64}' there, 'a{64}' now"):
        claim_run_dir(out, MODEL, Dist(), ident)
    assert json.loads((out / "run.json").read_text()) == legacy
    (out / "results.json").unlink()  # interrupted before its first benchmark: resumed
    claim_run_dir(out, MODEL, Dist(), ident)
    assert json.loads((out / "run.json").read_text()) == {**legacy, "identity": ident}
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match=r"afile is a file, not a directory"):
        claim_run_dir(tmp_path / "afile" / "sub" / "run", MODEL, Dist(), ident)


def test_run_dir_of_the_model_in_another_dtype_says_which(tmp_path):
    """The weights are fingerprinted as loaded, so --dtype bfloat16 into a float32 run's directory
    reads as another model; the refusal says the run was loaded as float32 and how to resume it."""
    from benchmarks.runner.dist import Dist
    from benchmarks.runner.run import claim_run_dir

    out = tmp_path / "run"
    claim_run_dir(out, {**MODEL, "path": "/ckpt"}, Dist(), {"limit": None})
    before = (out / "run.json").read_text()
    bf16 = {**MODEL, "path": "/ckpt", "fingerprint": "b" * 64, "dtype": "torch.bfloat16"}
    with pytest.raises(InputError, match=r"holds a run of another model .*; that run loaded its weights as float32, this "
                                         r"one as bfloat16: if the checkpoint is the same, rerun with --dtype float32 to "
                                         r"resume it, or use another --out\. Nothing was overwritten"):
        claim_run_dir(out, bf16, Dist(), {"limit": None})
    with pytest.raises(InputError, match=r"not of this one \(fingerprint b{16}\); use another --out\. Nothing"):
        claim_run_dir(out, {**bf16, "dtype": MODEL["dtype"]}, Dist(), {"limit": None})  # same dtype: another model
    assert (out / "run.json").read_text() == before

def test_unreadable_run_manifest_says_what_to_do(tmp_path):
    """A run.json cut short (edited by hand, a damaged disk) is refused naming it, what it should
    hold and what to do; it stays as it was for the user to mend (the cache beside it is intact)."""
    from benchmarks.runner.dist import Dist
    from benchmarks.runner.run import claim_run_dir

    ident = {"suite_sha256": "a" * 64, "limit": None}
    out = tmp_path / "run"
    claim_run_dir(out, MODEL, Dist(), ident)
    text = (out / "run.json").read_text()
    for damaged in (text[:len(text) // 2], "[]", '{"model": "x"}'):
        (out / "run.json").write_text(damaged)
        with pytest.raises(InputError, match=rf"--out {out}: {out}/run\.json is not a chameleon-bench run manifest: "
                                             r"expected the JSON object with the run's 'model' written when it began; "
                                             r"restore it, or use another --out\. Nothing was written"):
            claim_run_dir(out, MODEL, Dist(), ident)
        assert (out / "run.json").read_text() == damaged

def test_bad_data_fails_before_out_is_claimed(tmp_path):
    from benchmarks.runner.run import run_suite

    class Backend:  # run_suite must stop before it asks the backend for anything but its description
        def describe(self):
            return MODEL

    suite = load_suite(str(suite_file(tmp_path, GOOD)))
    data = tmp_path / "data" / "mmlu" / "test"
    data.mkdir(parents=True)
    with pytest.raises(InputError, match=r"mmlu/test/\w+_test\.csv' not found; expected .* under data_dir"):
        run_suite(suite, Backend(), tmp_path / "out", data_dir=tmp_path / "data")
    assert not (tmp_path / "out").exists()


def test_short_fewshot_split_fails_before_out_is_claimed(tmp_path):
    """An MMLU dev file with fewer rows than the suite's shots is named before the model loads;
    lm-eval would fail with an AssertionError traceback once the benchmark's turn came."""
    import shutil

    from benchmarks.runner.run import check_inputs, run_suite

    class Backend:
        def describe(self):
            return MODEL

    data = tmp_path / "data"
    shutil.copytree(REPO / "benchmarks" / "data" / "mmlu", data / "mmlu")
    dev = data / "mmlu" / "dev" / "anatomy_dev.csv"
    dev.write_text("".join(dev.read_text().splitlines(keepends=True)[:4]))  # header + 3 rows
    suite = load_suite(str(suite_file(tmp_path, GOOD)))
    with pytest.raises(InputError, match=r"anatomy_dev\.csv: 3 row\(s\) in the few-shot \(dev\) split of "
                                         r"chameleon_mmlu_anatomy; 5-shot prompts need at least 5"):
        run_suite(suite, Backend(), tmp_path / "out", data_dir=data)
    assert not (tmp_path / "out").exists()
    check_inputs(load_suite(str(suite_file(tmp_path, GOOD.replace("shots: 5", "shots: 3")))), data)  # 3 suffice


def test_missing_caption_images_fail_before_out_is_claimed(tmp_path):
    """A Flickr30k benchmark without --images-dir flickr30k=DIR (none is shipped) is refused up
    front, not when the suite reaches it after its text benchmarks."""
    from benchmarks.runner.run import run_suite

    class Backend:
        def describe(self):
            return MODEL

    text = "name: s\nbenchmarks:\n  - {name: g, benchmark: gsm8k, limit: 1}\n  - {name: f, benchmark: flickr30k, limit: 1}\n"
    suite = load_suite(str(suite_file(tmp_path, text)))
    with pytest.raises(InputError, match=r"benchmark 'f': images directory .* does not exist; pass --images-dir flickr30k=DIR"):
        run_suite(suite, Backend(), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds none of the 1000 images of its references"):
        run_suite(suite, Backend(), tmp_path / "out", images_dirs={"flickr30k": tmp_path / "empty"})
    assert not (tmp_path / "out").exists()


def test_unusable_caption_image_fails_before_out_is_claimed(tmp_path):
    """An image preprocessing cannot take (here 3300x90, too elongated) is named from its header
    before any work, not when the run reaches its item."""
    from PIL import Image

    from benchmarks.runner.run import run_suite

    class Backend:
        def describe(self):
            return MODEL

    images = tmp_path / "coco"
    images.mkdir()
    for f in (REPO / "benchmarks/data/images/coco").glob("*.jpg"):
        (images / f.name).write_bytes(f.read_bytes())
    bad = images / "COCO_val2014_000000199764.jpg"
    Image.new("RGB", (3300, 90)).save(bad)
    text = "name: s\nbenchmarks:\n  - {name: g, benchmark: gsm8k, limit: 1}\n  - {name: c, benchmark: coco, limit: 1}\n"
    suite = load_suite(str(suite_file(tmp_path, text)))
    with pytest.raises(InputError, match=rf"benchmark 'c': {bad}: a 3300x90 image is too elongated"):
        run_suite(suite, Backend(), tmp_path / "out", images_dirs={"coco": images})
    assert not (tmp_path / "out").exists()


CAPTIONING = "name: s\nbenchmarks:\n  - {name: g, benchmark: gsm8k, limit: 1}\n  - {name: c, benchmark: coco, limit: 1}\n"


def test_captioning_on_a_backend_without_image_input_refused_before_any_work(tmp_path):
    """Refused up front, naming backend, checkpoint and what is missing, not after the text benchmarks."""
    from benchmarks.runner.run import run_suite

    class Backend:
        image_problem = "it lacks processor_config.json"

        def describe(self):
            return {**MODEL, "backend": "hf", "path": "ckpt"}

    suite = load_suite(str(suite_file(tmp_path, CAPTIONING)))
    with pytest.raises(InputError, match=r"s\.yaml: benchmark\(s\) c need image input, which backend hf cannot give "
                                         r"--model ckpt: it lacks processor_config.json\. Nothing was run"):
        run_suite(suite, Backend(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_captioning_on_hf_without_processor_before_loading(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "chameleon"}')  # no weights: loading would fail otherwise
    proc = run_cli(REPO, "run", suite_file(tmp_path, CAPTIONING), "--backend", "hf", "--model", ckpt, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"backend hf cannot give --model {ckpt}: it lacks processor_config.json and preprocessor_config.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_non_utf8_data_files_named(tmp_path):
    from benchmarks.text.data import load_gsm8k, load_mmlu

    (tmp_path / "t.csv").write_bytes(b"question,choice0,choice1,choice2,choice3,answer\nQ\xe9,a,b,c,d,0\n")
    with pytest.raises(InputError, match=r"t\.csv: line 2: not UTF-8 text \(byte 0xe9\)"):
        load_mmlu({"test": "t.csv"}, data_dir=tmp_path)
    (tmp_path / "t.jsonl").write_bytes(b'\xfe{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(InputError, match=r"t\.jsonl: line 1: not UTF-8 text"):
        load_gsm8k({"test": "t.jsonl"}, data_dir=tmp_path)


def test_store_drops_torn_last_line_and_dedupes(tmp_path):
    store = RecordStore(tmp_path, shard="rank0")
    store.put_many([("a", 1), ("b", [2.5, True])])
    store.close()
    with open(tmp_path / "rank0.jsonl", "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"key": "c", "val')
    (tmp_path / "rank1.jsonl").write_text('{"key": "a", "value": 99}\n{"key": "d", "value": 4}\n')
    store = RecordStore(tmp_path, shard="rank0")
    assert store.get("a")["value"] in (1, 99) and store.get("b")["value"] == [2.5, True] and "c" not in store
    store.put_many([("c", 3), ("a", 5)])  # "a" is already there: not written twice
    store.close()
    lines = (tmp_path / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]


def test_store_skips_lines_that_are_not_records(tmp_path, capsys):
    (tmp_path / "rank0.jsonl").write_text('{"key": "a", "value": 1}\n[1, 2]\n{"key": "b"}\n"x"\n{"key": "c", "value": 3}\n')
    store = RecordStore(tmp_path, shard="rank0")
    assert "a" in store and "c" in store and "b" not in store
    warned = capsys.readouterr().err
    assert all(f"rank0.jsonl: line {n} is not a cache record; ignored" in warned for n in (2, 3, 4)), warned
    store.put_many([("b", 2)])  # recomputed, appended; nothing else lost
    store.close()
    assert (tmp_path / "rank0.jsonl").read_text().endswith('{"key": "c", "value": 3}\n{"key": "b", "value": 2}\n')


def test_store_keeps_a_complete_last_record_without_newline(tmp_path):
    (tmp_path / "rank0.jsonl").write_text('{"key": "a", "value": 1}\n{"key": "b", "value": [2]}')
    store = RecordStore(tmp_path, shard="rank0")
    store.put_many([("c", 3)])
    store.close()
    assert [json.loads(x)["key"] for x in (tmp_path / "rank0.jsonl").read_text().splitlines()] == ["a", "b", "c"]


def test_results_table():
    results = {"suite": {"name": "s"}, "model": {"backend": "chameleon", "fingerprint": "ab" * 32}, "complete": True,
               "benchmarks": {
                   "mmlu": {"primary_metric": "chameleon_mmlu/acc,none", "n_failed": 2, "metrics": {
                       "chameleon_mmlu/acc,none": mean_entry([1.0, 0.0, 1.0, 1.0]),
                       "chameleon_mmlu_anatomy/acc,none": mean_entry([1.0])}},
                   "coco": {"primary_metric": "CIDEr", "n_failed": 0, "metrics": {"CIDEr": mean_entry([0.5, 1.1])}}}}
    table = format_results_table(results)
    assert "anatomy" not in table  # subtasks stay in results.json
    row = next(line for line in table.splitlines() if line.startswith("mmlu"))
    assert row.split() == ["mmlu", "chameleon_mmlu/acc,none", "75.0", "49.0", "4", "2"]
    assert "0.800" in next(line for line in table.splitlines() if line.startswith("coco"))
    assert table.startswith("suite s  model chameleon:abababababab  (complete)\n")
    fingerprint = "responses:" + hashlib.sha256(b"x").hexdigest()  # the backend once, 12 hex digits
    table = format_results_table({**results, "model": {"backend": "responses", "fingerprint": fingerprint}})
    assert table.startswith(f"suite s  model responses:{fingerprint[10:22]}  (complete)\n")


def test_caption_metrics_on_one_scale():
    """Every caption metric as results.json holds it (Bleu_1..Bleu_3 were shown x100 beside a raw
    Bleu_4), and a suite's `BLEU` is summarised by Bleu_4 (the summary line showed `BLEU -`)."""
    from benchmarks.runner.captioning import primary_metric
    from benchmarks.runner.progress import summary_line

    names = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    entry = {"primary_metric": primary_metric(["BLEU", "CIDEr"]), "n_items": 2, "n_failed": 0,
             "metrics": {name: mean_entry([0.5, 0.7]) for name in names}}
    rows = [line.split() for line in format_results_table({"benchmarks": {"coco": entry}}).splitlines()
            if line.startswith("coco")]
    assert [r[1:4] for r in rows] == [[name, "0.600", "0.196"] for name in names]
    assert "  Bleu_4 0.600 ± 0.196 | n=2, 0 failed" in summary_line("coco", entry)
    assert [primary_metric([m]) for m in ("bleu", "Bleu_2", "rouge", "cider", "SPICE")] == \
        ["Bleu_4", "Bleu_2", "ROUGE_L", "CIDEr", "SPICE"]


def test_exemplar_pool_checked_before_out_is_claimed(tmp_path):
    from benchmarks.runner.run import run_suite

    class Backend:
        def describe(self):
            return MODEL

    text = (f"name: s\nbenchmarks:\n  - {{name: c, benchmark: coco, shots: 2, limit: 1, exemplars: coco_karpathy_test, "
            f"exemplar_images: {tmp_path / 'no_such_dir'}}}\n")
    suite = load_suite(str(suite_file(tmp_path, text)))
    with pytest.raises(InputError, match=r"s\.yaml: benchmark 'c': .*no_such_dir"):
        run_suite(suite, Backend(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exemplar_split_for_a_pool_without_splits_is_refused(tmp_path):
    """An exemplar_split the pool file cannot honour (a COCO annotation file has no splits) was
    ignored, the whole file used; now refused naming the file and the key, before --out is claimed.
    Left out, the same pool is accepted (used whole)."""
    from benchmarks.runner.run import check_inputs

    text = "name: s\nbenchmarks:\n  - {name: c, benchmark: coco, shots: 1, limit: 1, exemplars: coco_caption_demo}\n"
    check_inputs(load_suite(str(suite_file(tmp_path, text))))
    suite = suite_file(tmp_path, text.replace("coco_caption_demo", "coco_caption_demo, exemplar_split: train"))
    proc = run_cli(REPO, "run", suite, "--model", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"s\.yaml: benchmark 'c': 'exemplar_split' 'train' given, but exemplars file \S*coco_caption_demo/"
                     r"captions_val2014_fakecap1000_refs\.derived\.json has no splits", proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def finished_responses_run(tmp_path):
    """(suite, responses file, run directory) of a finished two-item run of the responses backend."""
    suite = tmp_path / "s.yaml"
    suite.write_text("name: t\nbackend: responses\nbenchmarks:\n  - {name: g, benchmark: gsm8k, shots: 0, limit: 2}\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"item_id": "chameleon_gsm8k_cot/0", "output": "The answer is 1."}\n'
                         '{"item_id": "chameleon_gsm8k_cot/1", "output": "The answer is 2."}\n')
    out = tmp_path / "run"
    assert run_cli(REPO, "run", suite, "--model", responses, "--out", out).returncode == 0
    return suite, responses, out


def test_damaged_run_dir_is_named_and_keeps_the_cache(tmp_path):
    """A file where the run directory has a directory (or the reverse) is an error naming it, without a
    traceback; finished requests stay cached, results.json's temporary file is not left behind, and the
    repaired directory resumes."""
    suite, responses, out = finished_responses_run(tmp_path)
    cache = (out / "cache" / "rank0.jsonl").read_bytes()
    (out / "results.json").unlink()
    (out / "results.json").mkdir()
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"error: --out .*run: cannot read or write .*run/results\.json \(Is a directory\); requests "
                     r"finished so far stay in its cache/", proc.stderr), proc.stderr
    assert not (out / "results.json.tmp").exists() and (out / "cache" / "rank0.jsonl").read_bytes() == cache
    (out / "results.json").rmdir()
    (out / "samples" / "g.jsonl").unlink()
    (out / "samples").rmdir()
    (out / "samples").write_text("")
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out)
    assert proc.returncode == 2 and "samples (a file where a directory belongs)" in proc.stderr, proc.stderr
    (out / "samples").unlink()
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out)
    assert proc.returncode == 0 and "0 requests computed, 2 cached" in proc.stderr, proc.stderr


def test_full_disk_is_named_without_a_traceback(tmp_path, monkeypatch, capsys):
    """A write to an open cache file on a full disk names no file; it is still an error about --out
    (exit 2, no traceback), not an uncaught OSError. The disk is made full by the store's write."""
    import errno

    from benchmarks.cli import main
    from benchmarks.runner import store

    def full(self, items):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.RecordStore, "put_many", full)
    suite = tmp_path / "s.yaml"
    suite.write_text("name: t\nbackend: responses\nbenchmarks:\n  - {name: g, benchmark: gsm8k, shots: 0, limit: 1}\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"item_id": "chameleon_gsm8k_cot/0", "output": "The answer is 1."}\n')
    assert main(["run", str(suite), "--model", str(responses), "--out", str(tmp_path / "run")]) == 2
    assert re.search(r"error: --out .*run: cannot read or write its files \(No space left on device\)", capsys.readouterr().err)


def test_responses_output_must_be_valid_unicode(tmp_path):
    """JSON can spell a lone surrogate; it used to pass as a string and crash the run after the model's
    requests (writing captions for the PTB tokenizer)."""
    from benchmarks.backends.responses import ResponsesBackend

    path = tmp_path / "r.jsonl"
    path.write_text('{"item_id": "1", "output": "a cat"}\n{"item_id": "2", "output": "a \\ud800 dog"}\n')
    with pytest.raises(InputError, match=r"r\.jsonl:2: field 'output' must be a string of valid Unicode text"):
        ResponsesBackend(str(path))


def test_generation_budget_and_caption_pool_checked_before_any_benchmark(tmp_path):
    """A max_gen_toks that leaves the model no room for a prompt, and more caption shots than the
    scored split has exemplars for, are refused before any benchmark runs (they failed when their
    benchmark's turn came, after earlier ones had run into --out)."""
    from benchmarks.runner.run import check_generation_room, check_inputs

    class Backend:
        max_length = 2048

    roomy = load_suite(str(suite_file(tmp_path, GOOD.replace("shots: 5", "generation: {max_gen_toks: 2047}"))))
    check_generation_room(roomy, Backend())
    greedy = load_suite(str(suite_file(tmp_path, GOOD.replace("mmlu, shots: 5", "gsm8k, generation: {max_gen_toks: 2048}"))))
    with pytest.raises(InputError, match=r"s\.yaml: benchmark 'm': generation max_gen_toks 2048 leaves no room for a prompt "
                                         r"in the model's context of 2048 tokens; expected fewer\. Nothing was run"):
        check_generation_room(greedy, Backend())
    shots = load_suite(str(suite_file(tmp_path, GOOD.replace("mmlu, shots: 5", "coco, shots: 12, subset: with_images"))))
    with pytest.raises(InputError, match=r"s\.yaml: benchmark 'm': 12-shot prompts draw their exemplars from the scored "
                                         r"split's items with an image, the query excluded: 4 have one, 13 are needed"):
        check_inputs(shots)


def test_deleted_run_manifest_resumes_from_results_and_cache(tmp_path):
    """A run directory whose run.json was deleted is not stranded: its results.json tells whose run it
    is (another model or suite is still refused, nothing touched), so the same command resumes from
    the cache and writes run.json again; a directory left with only its cache/ (whose keys hash the
    model: it answers no other) is resumed too."""
    suite, responses, out = finished_responses_run(tmp_path)
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out, "--limit", "1")
    assert proc.returncode == 2 and "(limit unset there, 1 now)" in proc.stderr, proc.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(responses.read_text().replace("1.", "3."))
    proc = run_cli(REPO, "run", suite, "--model", other, "--out", out)
    assert proc.returncode == 2 and "holds a run of another model" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out)
    assert proc.returncode == 0 and "0 requests computed, 2 cached" in proc.stderr, proc.stderr
    assert json.loads((out / "run.json").read_text())["identity"] == manifest["identity"]
    fresh = tmp_path / "fresh"  # the cache alone, copied into a new directory
    (fresh / "cache").mkdir(parents=True)
    (fresh / "cache" / "rank0.jsonl").write_bytes((out / "cache" / "rank0.jsonl").read_bytes())
    (fresh / "notes.txt").write_text("mine")  # anything else: whose run is unknown, so it is named
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", fresh)
    assert proc.returncode == 2 and "holds a run's cache/ but no run.json" in proc.stderr, proc.stderr
    (fresh / "notes.txt").unlink()
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", fresh)
    assert proc.returncode == 0 and "0 requests computed, 2 cached" in proc.stderr, proc.stderr


def test_deleted_run_manifest_refuses_other_data(tmp_path):
    """Without run.json, results.json's overrides still say which data the run read: a rerun with
    another --data-dir is refused, as it is with run.json, not let overwrite the run's results."""
    import shutil

    suite, responses, out = finished_responses_run(tmp_path)
    (out / "run.json").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    data = tmp_path / "data"
    shutil.copytree(REPO / "benchmarks" / "data" / "gsm8k", data / "gsm8k")
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out, "--data-dir", data)
    assert proc.returncode == 2 and f"data_dir unset there, {str(data)!r} now" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    proc = run_cli(REPO, "run", suite, "--model", responses, "--out", out, "--data-dir", REPO / "benchmarks" / "data")
    assert proc.returncode == 0 and "0 requests computed, 2 cached" in proc.stderr, proc.stderr  # the shipped data, named


def test_deleted_run_manifest_tells_relative_data_dirs_apart(tmp_path):
    """results.json records --data-dir absolute, as run.json's identity does: a rerun without run.json
    from another working directory with the same relative --data-dir names other data, and is
    refused as it is with run.json (it was resolved in the new directory and adopted)."""
    import shutil

    suite, responses, _ = finished_responses_run(tmp_path)
    for where in ("a", "b"):
        shutil.copytree(REPO / "benchmarks" / "data" / "gsm8k", tmp_path / where / "data" / "gsm8k")
    out = tmp_path / "run2"
    assert run_cli(tmp_path / "a", "run", suite, "--model", responses, "--out", out, "--data-dir", "data").returncode == 0
    assert json.loads((out / "results.json").read_text())["overrides"]["data_dir"] == str(tmp_path / "a" / "data")
    (out / "run.json").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli(tmp_path / "b", "run", suite, "--model", responses, "--out", out, "--data-dir", "data")
    assert proc.returncode == 2, proc.stderr
    assert f"data_dir {str(tmp_path / 'a' / 'data')!r} there, {str(tmp_path / 'b' / 'data')!r} now" in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    proc = run_cli(tmp_path / "b", "run", suite, "--model", responses, "--out", out, "--data-dir", tmp_path / "a" / "data")
    assert proc.returncode == 0 and "0 requests computed, 2 cached" in proc.stderr, proc.stderr


def test_deleted_run_manifest_tells_relative_caption_files_apart(tmp_path):
    """results.json records the run's identity, caption files included: a rerun without run.json from
    another working directory, where the suite's relative `references: refs.json` is another file,
    is refused as it is with run.json (it was adopted and the first run's results overwritten)."""
    suite = tmp_path / "s.yaml"
    suite.write_text("name: t\nbackend: responses\nbenchmarks:\n  - {name: c, benchmark: coco, references: refs.json}\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"item_id": "199510", "output": "A dog on a bench."}\n')
    for where, caption in (("a", "a dog sitting on a bench"), ("b", "a cat asleep on a sofa")):
        (tmp_path / where).mkdir()
        (tmp_path / where / "refs.json").write_text(json.dumps([{"image": "val2014/COCO_val2014_000000199510.jpg", "caption": [caption]}]))
    out = tmp_path / "run"
    assert run_cli(tmp_path / "a", "run", suite, "--model", responses, "--out", out).returncode == 0
    (out / "run.json").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli(tmp_path / "b", "run", suite, "--model", responses, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert f"caption_files {{'c': [{str(tmp_path / 'a' / 'refs.json')!r}, None, None]}} there" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    proc = run_cli(tmp_path / "a", "run", suite, "--model", responses, "--out", out)  # its own directory resumes
    assert proc.returncode == 0 and "0 requests computed, 1 cached" in proc.stderr, proc.stderr
