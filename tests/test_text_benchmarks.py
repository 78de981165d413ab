"""Text benchmark task configs, local data loading and input errors (no model needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.text import BENCHMARKS, run_text_benchmark, text_task_manager
from benchmarks.text.data import SHIPPED_DATA_DIR, load_gsm8k, load_math, load_mmlu
from benchmarks.text.filters import majority_sample
from benchmarks.text.run import default_maj_at, task_spec
from chameleon.errors import InputError


@pytest.fixture(scope="module")
def tm():
    return text_task_manager()


def _docs(tm, name):
    task = tm.load(name)["tasks"][name]
    return task, list(task.test_docs())


def test_shipped_subsets_load_with_paper_defaults(tm):
    task, docs = _docs(tm, "chameleon_gsm8k_cot")
    assert len(docs) == 50 and docs[0]["question"].startswith("Janet")
    exemplars = list(task.fewshot_docs())
    assert task.config.num_fewshot == 8 and len(exemplars) == 8
    assert exemplars[0]["question"].startswith("There are 15 trees in the grove")
    assert task.doc_to_target(docs[0]) == "18"

    task, docs = _docs(tm, "chameleon_math500")
    assert len(docs) == 50 and task.config.num_fewshot == 4
    # minerva's process_docs put the normalized last \boxed{} answer on each doc ("\left( 3, \frac{\pi}{2} \right)")
    assert docs[0]["answer"] == "\\left(3,\\frac{\\pi}{2}\\right)"

    loaded = tm.load("chameleon_math")
    assert sorted(loaded["tasks"]) == sorted(f"chameleon_math_{s}" for s in
                                             ["algebra", "counting_and_prob", "geometry", "intermediate_algebra",
                                              "num_theory", "prealgebra", "precalc"])
    assert all(len(list(t.test_docs())) == 10 for t in loaded["tasks"].values())

    loaded = tm.load("chameleon_mmlu")
    assert len(loaded["tasks"]) == 57
    anatomy = loaded["tasks"]["chameleon_mmlu_anatomy"]
    assert anatomy.config.num_fewshot == 5 and len(list(anatomy.fewshot_docs())) == 5
    doc = next(iter(anatomy.test_docs()))
    assert len(doc["choices"]) == 4 and doc["answer"] in range(4)
    assert anatomy.doc_to_text(doc).endswith("\nAnswer:")


def test_lm_eval_builtin_hub_tasks_stay_available():
    tm = text_task_manager(include_defaults=True)
    for name in ["gsm8k_cot", "gsm8k_cot_self_consistency", "minerva_math", "minerva_math500", "mmlu",
                 "chameleon_gsm8k_cot", "chameleon_mmlu"]:
        assert name in tm.all_tasks


def test_data_dir_reads_other_copies(tmp_path):
    # A "full copy" elsewhere with the same layout: here 3 real GSM8K rows.
    (tmp_path / "gsm8k").mkdir()
    lines = (SHIPPED_DATA_DIR / "gsm8k/test.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "gsm8k/test.jsonl").write_text("".join(lines[10:13]))
    tm = text_task_manager(tmp_path)
    _, docs = _docs(tm, "chameleon_gsm8k_cot")
    assert [d["question"] for d in docs] == [json.loads(line)["question"] for line in lines[10:13]]
    # absolute data_files bypass data_dir
    ds = load_gsm8k({"test": str(tmp_path / "gsm8k/test.jsonl")}, data_dir=str(SHIPPED_DATA_DIR))
    assert len(ds["test"]) == 3


def test_sampled_variants_vote_over_k(tm):
    assert default_maj_at("gsm8k", 32) == (8, 32) and default_maj_at("math", 4) == (4,)
    task = task_spec(tm, "gsm8k", 16, (1, 8))
    assert task.config.repeats == 16 and task.config.generation_kwargs["do_sample"] is True
    assert [f.name for f in task._filters] == ["maj@1", "maj@8", "maj@16"]
    group = task_spec(tm, "math", 2)
    assert {t.config.repeats for t in group.get_all_tasks()} == {2}
    assert {f.name for t in group.get_all_tasks() for f in t._filters} == {"maj@2"}
    assert task_spec(tm, "mmlu") == "chameleon_mmlu"


def test_minerva_majority_vote_uses_normalized_answers():
    samples = [
        "x = 2. Final Answer: The final answer is $0.5$. I hope it is correct.",
        "so it is \\frac12. Final Answer: The final answer is $\\frac12$. I hope it is correct.",
        "no answer line here",
        "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.",
    ]
    # \frac12 and \frac{1}{2} normalize alike (2 votes); the first such sample is passed on whole
    assert majority_sample(samples) == samples[1]
    assert majority_sample(["garbage", "more garbage"]) == "garbage"


def _gsm8k_votes(tm, samples: list[str], k: int = 8) -> tuple[str, float]:
    """The gsm8k maj@k filter's answer for one question's k samples, and exact_match's score of it
    (target 1000), both through the task's own filter and metric."""
    from lm_eval.api.instance import Instance

    task = task_spec(tm, "gsm8k", k)
    doc = {"question": "q", "answer": "#### 1000"}
    inst = Instance("generate_until", doc, ("Q: q\nA:", {}), 0)
    inst.resps = list(samples)
    next(f for f in task._filters if f.name == f"maj@{k}").apply([inst])
    answer = inst.filtered_resps[f"maj@{k}"]
    return answer, task.process_results(doc, [answer])["exact_match"]


def test_gsm8k_majority_vote_counts_answers_as_exact_match_compares_them(tm):
    """maj@k votes over the final answers: one answer written two ways ("1,000", "1000") is one
    answer, as exact_match scores it, and samples without "The answer is N." have no answer to vote
    for (lm-eval's majority_vote counted "[invalid]" as one, which then won here)."""
    said = lambda n: f"So the total is {n}. The answer is {n}."  # noqa: E731
    samples = ["I am not sure.", "It is hard."] + [said("1,000")] * 2 + [said("1000"), said(7), said(7), "Hmm."]
    assert _gsm8k_votes(tm, samples) == ("1,000", 1.0)
    # ties go to the answer given first; with no answer at all the vote is "[invalid]"
    assert _gsm8k_votes(tm, [said(7), said(1000)] * 4)[0] == "7"
    assert _gsm8k_votes(tm, ["Hmm."] * 8) == ("[invalid]", 0.0)
    task = task_spec(tm, "gsm8k", 32)  # every vote compares answers as the task's exact_match does
    [metric] = task.config.metric_list
    for f in task._filters:
        assert f.filters[-2].keywords == {k: v for k, v in metric.items() if k.startswith(("ignore_", "regexes_"))}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "loader, name, text, message",
    [
        (load_gsm8k, "g.jsonl", '{"question": "q"}\n', r"g.jsonl: line 1: field 'answer'"),
        (load_gsm8k, "g.jsonl", '{"question": "q", "answer": "42"}\n', r"line 1: field 'answer' must end with '#### "),
        (load_gsm8k, "g.jsonl", '{"question": "q", "answer": "#### 1"}\n{oops\n', r"g.jsonl: line 2: not valid JSON"),
        (load_gsm8k, "g.jsonl", "[1, 2]\n", r"line 1: expected a JSON object"),
        (load_math, "m.jsonl", '{"problem": "p", "solution": "it is 3"}\n', r"m.jsonl: line 1: field 'solution' has no \\boxed"),
        (load_math, "m.jsonl", '{"solution": "\\\\boxed{3}"}\n', r"line 1: field 'problem'"),
        (load_mmlu, "x_test.csv", "q,a,b,c,d,answer\n", r"x_test.csv: header must be question,choice0"),
        (load_mmlu, "x_test.csv", "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,4\n",
         r"x_test.csv: line 2: field 'answer' must be 0, 1, 2 or 3, got '4'"),
        (load_mmlu, "x_test.csv", "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c\n",
         r"line 2: expected 6 columns, got 4"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, loader, name, text, message):
    _write(tmp_path / name, text)
    with pytest.raises(InputError, match=message):
        loader({"test": name}, data_dir=str(tmp_path))


def test_math_subject_must_be_known(tmp_path):
    _write(tmp_path / "m.jsonl", '{"problem": "p", "solution": "\\\\boxed{3}", "type": "Topology"}\n')
    with pytest.raises(InputError, match=r"m.jsonl: line 1: field 'type' must be one of"):
        load_math({"test": "m.jsonl"}, data_dir=str(tmp_path), subject="Algebra")


def test_missing_files_and_bad_data_dir(tmp_path):
    shutil.copytree(SHIPPED_DATA_DIR / "gsm8k", tmp_path / "gsm8k")
    with pytest.raises(InputError, match=r"test file .*mmlu/test/anatomy_test.csv.* not found.*under data_dir"):
        text_task_manager(tmp_path).load("chameleon_mmlu_anatomy")
    with pytest.raises(InputError, match=r"data_dir .*nope.* is not a directory"):
        text_task_manager(tmp_path / "nope")
    # a directory where the file belongs is named as one, with the file's format
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").mkdir(parents=True)
    with pytest.raises(InputError, match=r"test file .*mmlu/test/anatomy_test.csv' is a directory; expected .* to be "
                                         r"a CSV file with header question,choice0,choice1,choice2,choice3,answer"):
        text_task_manager(tmp_path).load("chameleon_mmlu_anatomy")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"benchmark": "hellaswag"}, r"unknown text benchmark 'hellaswag'; expected one of \['gsm8k', 'math'"),
        ({"benchmark": "mmlu", "k": 4}, r"mmlu is scored by log-likelihood; k must be 1"),
        ({"benchmark": "gsm8k", "k": 0}, r"k must be >= 1"),
        ({"benchmark": "gsm8k", "k": 8, "maj_at": (16,)}, r"maj_at values must lie in 1..k=8"),
        ({"benchmark": "gsm8k", "maj_at": (4,)}, r"maj_at needs k > 1"),
        ({"benchmark": "math", "num_fewshot": 5}, r"num_fewshot for math must be 0..4"),
        ({"benchmark": "gsm8k", "limit": 0}, r"limit must be a positive integer"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, message):
    # the checks run before any model call, so no model is needed
    with pytest.raises(InputError, match=message):
        run_text_benchmark(None, **kwargs)


def test_benchmark_table_matches_task_files(tm):
    for spec in BENCHMARKS.values():
        assert spec.greedy in tm.all_tasks
        assert spec.sampled is None or spec.sampled in tm.all_tasks
