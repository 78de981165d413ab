"""Bad input to the runner: InputError naming file/key/flag, CLI exit 2 without traceback; the
record store's tolerance of a torn last line; the results table."""

from __future__ import annotations

import json
import subprocess
import sys

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
    (GOOD.replace("shots", "shot"), r"s\.yaml: benchmarks\[0\]: unknown key 'shot'; did you mean 'shots'\? \(allowed: .*limit"),
    ("name: t\nbenchmark: []\n", r"s\.yaml: unknown key 'benchmark'; did you mean 'benchmarks'\?"),
    (GOOD.replace("shots: 5", "shots: five"), r"benchmarks\[0\]: 'shots' must be int, got 'five'"),
    (GOOD.replace("shots: 5", "k: 4"), r"benchmark 'm': k=4 samples need generation.do_sample"),
    (GOOD.replace("shots: 5", "generation: {temprature: 0.6}"), r"generation: unknown key 'temprature'; did you mean 'temperature'"),
    (GOOD.replace("mmlu, shots: 5", "mmlu, subset: all"), r"apply to captioning"),
    (GOOD + "  - {name: m, benchmark: gsm8k}\n", r"benchmark 'm': duplicate name"),
    ("name: t\nbenchmarks: [\n", r"s\.yaml: not valid YAML"),
])
def test_suite_validation(tmp_path, text, match):
    with pytest.raises(InputError, match=match):
        load_suite(str(suite_file(tmp_path, text)))


def test_unknown_suite_name():
    with pytest.raises(InputError, match=r"suite 'papr': not a shipped suite \(paper, smoke\)"):
        load_suite("papr")


@pytest.mark.parametrize("extra, match", [
    (["--images-dir", "cocoo=/tmp"], r"--images-dir 'cocoo=/tmp': expected DATASET=DIR with DATASET one of coco, flickr30k"),
    (["--limit", "0"], r"--limit must be >= 1"),
    (["--backend", "hf"], r"config.json"),
])
def test_cli_bad_input_exits_2(tmp_path, extra, match):
    suite = suite_file(tmp_path, GOOD)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "run", str(suite), "--model", str(tmp_path),
                           "--out", str(tmp_path / "out"), *extra], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_cli_typo_in_suite_exits_2(tmp_path):
    suite = suite_file(tmp_path, GOOD.replace("shots", "shot"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "run", str(suite), "--model", str(tmp_path),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "did you mean 'shots'" in proc.stderr and "Traceback" not in proc.stderr


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
