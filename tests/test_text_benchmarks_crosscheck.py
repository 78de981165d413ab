"""Our text tasks against lm-eval's own built-in task definitions, on one tiny model.

lm-eval's built-in tasks (`gsm8k_cot`, `minerva_math500`, `minerva_math_<subject>`,
`mmlu_<subject>`) point at hub datasets; here their YAML configs are loaded as they are and only
the dataset fields are pointed at the same local rows (plain `datasets` json loading, MMLU CSVs
converted to the cais/mmlu columns). Prompts, filters and metrics on that side are lm-eval's, so
equal per-item prompts, outputs and scores show our configs reproduce lm-eval's protocol.
The model is a random 2-layer Llama with a BPE tokenizer trained on the shipped GSM8K text,
run through lm-eval's `hf` model, greedy with 32 new tokens.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from benchmarks.text import run_text_benchmark
from benchmarks.text.data import MATH_SUBJECTS, SHIPPED_DATA_DIR
from benchmarks.text.run import collect_samples
from conftest import build_tiny_llama

pytestmark = pytest.mark.slow

GEN = {"max_gen_toks": 32}
COMPARED = ("doc_id", "filter", "prompt", "arguments", "resps", "filtered_resps", "target", "scores")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    out = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return HFLM(pretrained=str(out), batch_size=20, device="cpu")  # one batch per 20 items: 3x faster here


@pytest.fixture(scope="module")
def builtin_tm():
    return TaskManager()  # lm-eval's own tasks only


def _builtin(tm: TaskManager, name: str, **dataset) -> dict:
    """lm-eval's YAML for `name` (includes and !functions resolved), reading local rows instead of the hub."""
    cfg = load_yaml(tm.task_index[name].yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    return {**cfg, "dataset_path": "json", "dataset_name": None, **dataset}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_builtin(lm, tm, specs, **kwargs) -> dict:
    return simple_evaluate(lm, tasks=specs, task_manager=tm, gen_kwargs=GEN, bootstrap_iters=0, **kwargs)


def _by_item(samples: list[dict], rename=lambda task: task) -> dict:
    return {(rename(s["task"]), s["doc_id"], s["filter"]): {k: s[k] for k in COMPARED} for s in samples}


def _crosscheck_20(lm, tm, tmp_path, benchmark: str, builtin: str, data_file: str, prefix: str):
    """20 items of `benchmark` against lm-eval's `builtin` task on the same file; returns both runs."""
    ours = run_text_benchmark(lm, benchmark, limit=20, gen_kwargs=GEN, bootstrap_iters=0)
    ref = _run_builtin(lm, tm, [_builtin(
        tm, builtin, dataset_kwargs={"data_files": {"test": str(SHIPPED_DATA_DIR / data_file)}, "cache_dir": str(tmp_path)},
    )], limit=20)
    want = _by_item(collect_samples(ref))
    assert len(want) == 20 * len({key[2] for key in want})
    assert _by_item(ours.samples, lambda t: t.replace("chameleon_", prefix)) == want
    return ours, ref["results"][builtin]


def test_gsm8k_matches_lm_eval_gsm8k_cot(lm, builtin_tm, tmp_path):
    ours, ref = _crosscheck_20(lm, builtin_tm, tmp_path, "gsm8k", "gsm8k_cot", "gsm8k/test.jsonl", "")
    for flt in ("strict-match", "flexible-extract"):
        assert ours.metrics[f"chameleon_gsm8k_cot/exact_match,{flt}"]["value"] == ref[f"exact_match,{flt}"]
        assert ours.metrics[f"chameleon_gsm8k_cot/exact_match,{flt}"]["n"] == 20
    assert ours.primary == "chameleon_gsm8k_cot/exact_match,strict-match"
    assert list(ours.data_files) == [str(SHIPPED_DATA_DIR / "gsm8k/test.jsonl")]
    assert all(len(s["resps"][0][0]) > 0 for s in ours.samples)  # the model did generate


def test_math500_matches_lm_eval_minerva_math500(lm, builtin_tm, tmp_path):
    ours, ref = _crosscheck_20(lm, builtin_tm, tmp_path, "math500", "minerva_math500", "math/math500_test.jsonl", "minerva_")
    for metric in ("exact_match", "math_verify"):
        assert ours.metrics[f"chameleon_math500/{metric},none"]["value"] == ref[f"{metric},none"]
    assert ours.samples[0]["prompt"].startswith("Problem:\nFind the domain of the expression")


def test_full_math_matches_lm_eval_minerva_subjects(lm, builtin_tm, tmp_path):
    ours = run_text_benchmark(lm, "math", limit=2, gen_kwargs=GEN, bootstrap_iters=0)
    rows = [json.loads(line) for line in (SHIPPED_DATA_DIR / "math/math_test_full5000.jsonl").open()]
    specs = []
    for key, subject in MATH_SUBJECTS.items():
        # the hub copy lm-eval reads has one config per subject; here, one file per subject
        path = _jsonl(tmp_path / f"{key}.jsonl", [r for r in rows if r["type"] == subject])
        specs.append(_builtin(builtin_tm, f"minerva_math_{key}", training_split=None,
                              dataset_kwargs={"data_files": {"test": path}, "cache_dir": str(tmp_path / "cache")}))
    ref = _run_builtin(lm, builtin_tm, specs, limit=2)
    want = _by_item(collect_samples(ref))
    assert len(want) == 14 and _by_item(ours.samples, lambda t: t.replace("chameleon_", "minerva_")) == want
    # the group's size-weighted mean is the mean over all items
    scores = [s["scores"]["exact_match"] for s in ours.samples]
    assert ours.metrics["chameleon_math/exact_match,none"] == pytest.approx(
        {"value": sum(scores) / len(scores), "stderr": ours.metrics["chameleon_math/exact_match,none"]["stderr"], "n": 14})


def test_mmlu_matches_lm_eval_mmlu_subjects(lm, builtin_tm, tmp_path):
    ours = run_text_benchmark(lm, "mmlu", limit=1, bootstrap_iters=0)
    specs = []
    for dev in sorted((SHIPPED_DATA_DIR / "mmlu/dev").glob("*_dev.csv")):
        subject = dev.name[: -len("_dev.csv")]
        files = {}
        for split, path in (("dev", dev), ("test", SHIPPED_DATA_DIR / f"mmlu/test/{subject}_test.csv")):
            with path.open(newline="") as fh:
                rows = [{"question": r["question"], "subject": subject, "answer": int(r["answer"]),
                         "choices": [r[f"choice{i}"] for i in range(4)]} for r in csv.DictReader(fh)]
            files[split] = _jsonl(tmp_path / f"{subject}_{split}.jsonl", rows)
        specs.append(_builtin(builtin_tm, f"mmlu_{subject}",
                              dataset_kwargs={"data_files": files, "cache_dir": str(tmp_path / "cache")}))
    assert len(specs) == 57
    ref = _run_builtin(lm, builtin_tm, specs, limit=1, num_fewshot=5)
    want = _by_item(collect_samples(ref))
    assert len(want) == 57 and _by_item(ours.samples, lambda t: t.replace("chameleon_", "")) == want
    accs = [ref["results"][f"mmlu_{s}"]["acc,none"] for s in (spec["task"][len("mmlu_"):] for spec in specs)]
    assert ours.metrics["chameleon_mmlu/acc,none"]["value"] == pytest.approx(sum(accs) / 57)  # 1 item each
    assert ours.metrics["chameleon_mmlu/acc_macro,none"]["value"] == pytest.approx(sum(accs) / 57)
    assert ours.metrics["chameleon_mmlu_stem/acc,none"]["n"] == 19
    assert ours.primary == "chameleon_mmlu/acc,none"


def test_sampled_majority_vote(lm):
    res = run_text_benchmark(lm, "gsm8k", k=3, maj_at=(1,), limit=2, gen_kwargs=GEN, seed=7, bootstrap_iters=0)
    assert res.primary == "chameleon_gsm8k_cot_maj/exact_match,maj@3"
    assert {s["filter"] for s in res.samples} == {"maj@1", "maj@3"}
    strict = re.compile(r"The answer is (\-?[0-9\.\,]+).")
    for s in res.samples:
        assert s["arguments"][0][1]["do_sample"] is True and len(s["resps"][0]) == 3  # k samples per question
        answers = [m.group(1) if (m := strict.search(r)) else "[invalid]" for r in s["resps"][0]]
        counted = answers[:1] if s["filter"] == "maj@1" else answers
        # answers as exact_match compares them; "[invalid]" (no answer) only where none has one
        valid = [a for a in counted if a != "[invalid]"] or counted
        same = lambda a: re.sub(r"\.$", "", a.replace(",", "").replace("$", ""))  # noqa: E731
        assert s["filtered_resps"] == [max(valid, key=lambda a: [same(b) for b in valid].count(same(a)))]
    assert res.metrics["chameleon_gsm8k_cot_maj/exact_match,maj@3"]["n"] == 2


def test_greedy_rerun_is_answered_from_response_cache(lm, tmp_path, monkeypatch):
    cache = str(tmp_path / "responses")
    kwargs = dict(limit=2, gen_kwargs=GEN, use_cache=cache, bootstrap_iters=0)
    first = run_text_benchmark(lm, "math500", **kwargs)
    with sqlite3.connect(cache + "_rank0.db") as db:
        assert db.execute("select count(*) from unnamed").fetchone()[0] == 2

    def no_model_calls(requests):
        raise AssertionError(f"{len(requests)} requests reached the model")

    monkeypatch.setattr(lm, "generate_until", no_model_calls)
    again = run_text_benchmark(lm, "math500", **kwargs)
    assert _by_item(again.samples) == _by_item(first.samples) and again.metrics == first.metrics
