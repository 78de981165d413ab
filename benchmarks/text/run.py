"""Run one text benchmark through lm-eval and return metrics, per-item samples and provenance.

This is the building block the suite runner calls; it evaluates the task YAMLs in `tasks/`
with `lm_eval.simple_evaluate`, so prompts, filters and metrics are lm-eval's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.api.metrics import (
    aggregate_subtask_metrics, mean, pooled_sample_stderr, stderr_for_metric, unweighted_mean_stderr,
)
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: keeps `include` and `!function`
from lm_eval.utils import handle_non_serializable

from benchmarks.backends.base import request_hash
from benchmarks.text.data import resolve_data_files
from chameleon.errors import InputError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class TextBenchmark:
    greedy: str  # lm-eval task or group for maj@1 (greedy)
    sampled: str | None  # task or group with `repeats` and a majority-vote filter, for maj@k
    metric: str  # the paper's metric
    greedy_filter: str  # filter whose score is the maj@1 number
    max_fewshot: int  # exemplars available
    paper_k: tuple[int, ...] = ()  # the maj@k values the paper reports


BENCHMARKS = {
    "gsm8k": TextBenchmark("chameleon_gsm8k_cot", "chameleon_gsm8k_cot_maj", "exact_match", "strict-match", 8, (8, 32)),
    "math500": TextBenchmark("chameleon_math500", "chameleon_math500_maj", "exact_match", "none", 4, (4,)),
    "math": TextBenchmark("chameleon_math", "chameleon_math_maj", "exact_match", "none", 4, (4,)),
    "mmlu": TextBenchmark("chameleon_mmlu", None, "acc", "none", 5),
}


@dataclass
class TextBenchmarkResult:
    benchmark: str
    primary: str  # key in `metrics` of the paper's headline number
    metrics: dict[str, dict[str, Any]]  # "task/metric,filter" -> {"value", "stderr", "n"}
    samples: list[dict[str, Any]] = field(default_factory=list)
    task_configs: dict[str, Any] = field(default_factory=dict)  # lm-eval's resolved configs
    data_files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    lm_eval: dict[str, Any] = field(default_factory=dict)  # versions, seeds, n-shot


class _DropCustomDatasetHint(logging.Filter):
    # lm-eval logs a usage hint for every task with `custom_dataset` (57 for MMLU).
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


@contextmanager
def _swapped(module, **replacements):
    """The module's attributes of these names replaced for the duration (those it has: a name a
    later lm-eval drops is left alone), then restored."""
    saved = {name: getattr(module, name) for name in replacements if hasattr(module, name)}
    for name in saved:
        setattr(module, name, replacements[name])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _request_building_bars(enabled: bool):
    """lm-eval draws one tqdm bar per task while it builds requests (57 for MMLU) and has no option
    to turn them off; without `enabled` its module's `tqdm` is a disabled one for the duration."""
    if enabled:
        return contextlib.nullcontext()
    import lm_eval.api.task as task_module

    return _swapped(task_module, tqdm=functools.partial(task_module.tqdm, disable=True))


def _no_environment_probe():
    """simple_evaluate ends by probing the environment for its results: `git describe` in the
    working directory, which prints "fatal: not a git repository" to the terminal outside one (once
    per benchmark, amid the progress bars), and torch's collect_env, which runs pip and nvidia-smi
    (0.3-1.3 s a benchmark here). The runner reads neither (results.json records its own
    provenance), so both are skipped for the duration; of the latter's fields, lm_eval_version
    (read into results.json) is kept."""
    from importlib.metadata import PackageNotFoundError, version

    import lm_eval.evaluator as evaluator

    def lm_eval_version(results: dict) -> None:
        try:
            results["lm_eval_version"] = version("lm_eval")
        except PackageNotFoundError as err:  # (lm-eval records the error too, as its version)
            results["lm_eval_version"] = str(err)

    return _swapped(evaluator, get_git_commit_hash=lambda: None, add_env_info=lm_eval_version)


def text_task_manager(data_dir: str | Path | None = None, include_defaults: bool = False) -> TaskManager:
    """A TaskManager that knows the `chameleon_*` tasks, reading files under `data_dir`.

    `data_dir` None reads the subsets shipped in benchmarks/data. With `include_defaults`
    lm-eval's own (hub) tasks, e.g. `gsm8k_cot`, `minerva_math`, `mmlu`, stay available too.
    """
    data_dir = data_dir or None  # "" is unset, as resolve_data_files reads it (not the working directory)
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise InputError(f"data_dir {str(data_dir)!r} is not a directory")
    metadata = {"data_dir": str(data_dir)} if data_dir is not None else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=metadata)


def majority_filters(base: list[dict], k: int, maj_at: tuple[int, ...]) -> list[dict]:
    """Filters `maj@j` for each j: the vote pipeline `base` over the first j of k samples."""
    out = []
    for j in sorted(set(maj_at)):
        head = [{"function": "take_first_k", "k": j}] if j < k else []
        out.append({"name": f"maj@{j}", "filter": head + base})
    return out


def default_maj_at(benchmark: str, k: int) -> tuple[int, ...]:
    """maj@k, plus the paper's smaller maj@j read off the same k samples (gsm8k k=32: maj@8, maj@32)."""
    return tuple(sorted({k, *(j for j in _benchmark(benchmark).paper_k if j < k)}))


def task_spec(tm: TaskManager, benchmark: str, k: int = 1, maj_at: tuple[int, ...] | None = None):
    """What to pass to lm-eval for `benchmark`: a registered name, or for k samples its task or
    group built with `repeats=k` and maj@j vote filters."""
    spec = _benchmark(benchmark)
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if k == 1:
        if maj_at:
            raise InputError("maj_at needs k > 1 sampled solutions")
        return spec.greedy
    if spec.sampled is None:
        raise InputError(f"{benchmark} is scored by log-likelihood; k must be 1, got {k}")
    if maj_at and any(j < 1 or j > k for j in maj_at):
        raise InputError(f"maj_at values must lie in 1..k={k}, got {list(maj_at)}")
    maj_at = tuple(sorted({k, *maj_at})) if maj_at else default_maj_at(benchmark, k)
    entry = tm.task_index[spec.sampled]
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    # The YAML's full-k vote pipeline, i.e. the filter that does not subsample.
    base = next(f["filter"] for f in cfg["filter_list"] if f["filter"][0]["function"] != "take_first_k")
    overrides = {"repeats": k, "filter_list": majority_filters(base, k, maj_at)}
    # The factory merges overrides into the YAML and, for a group, into each subtask; an inline
    # dict spec would not (lm-eval passes a group dict's own keys on to its subtasks).
    return tm._factory.build(entry, overrides=overrides, registry=tm.task_index)


def run_text_benchmark(
    lm: LM,
    benchmark: str,
    *,
    data_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    k: int = 1,
    maj_at: tuple[int, ...] | None = None,
    limit: int | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    seed: int = 1234,
    log_samples: bool = True,
    use_cache: str | None = None,
    bootstrap_iters: int = 100000,
    lm_eval_bars: bool = True,
) -> TextBenchmarkResult:
    """Evaluate `lm` on `benchmark` ('gsm8k' | 'math' | 'math500' | 'mmlu').

    k=1 is greedy maj@1; k>1 samples k solutions per item and reports maj@j for j in `maj_at`
    (always k; default also the paper's smaller values) from the first j samples. `use_cache` is lm-eval's CachingLM sqlite path
    prefix (responses are reused on a rerun). `gen_kwargs` updates the tasks' generation
    settings (e.g. max_gen_toks, temperature). `lm_eval_bars` False hides lm-eval's per-task
    request-building progress bars (the suite runner draws its own, one per benchmark).
    """
    spec = _benchmark(benchmark)
    if num_fewshot is not None and not 0 <= num_fewshot <= spec.max_fewshot:
        raise InputError(f"num_fewshot for {benchmark} must be 0..{spec.max_fewshot}, got {num_fewshot}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    tm = text_task_manager(data_dir)
    task = task_spec(tm, benchmark, k, maj_at)
    with _request_building_bars(lm_eval_bars), _no_environment_probe(), warnings.catch_warnings():
        # lm-eval takes a softmax of every multiple-choice item's loglikelihoods, used only by its
        # brier_score metric (none of our tasks); an item whose requests all failed (-inf
        # placeholders) makes it NaN, and numpy warns. Harmless: that softmax goes unused, and the
        # item is scored 0 (score_failures_wrong).
        warnings.filterwarnings("ignore", "invalid value encountered in subtract", RuntimeWarning, r"lm_eval\.utils")
        out = simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=tm,
            num_fewshot=num_fewshot,
            limit=limit,
            gen_kwargs=gen_kwargs or None,
            log_samples=True,  # score_failures_wrong finds failed items there
            use_cache=use_cache,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    score_failures_wrong(out, getattr(lm, "failures", {}), tm, bootstrap_iters)
    top = spec.greedy if k == 1 else spec.sampled
    metrics = collect_metrics(out)
    if benchmark == "mmlu":
        metrics.update(macro_mean(out, top, "acc,none"))
    flt = spec.greedy_filter if k == 1 else f"maj@{k}"
    return TextBenchmarkResult(
        benchmark=benchmark,
        primary=f"{top}/{spec.metric},{flt}",
        metrics=metrics,
        samples=collect_samples(out) if log_samples else [],
        task_configs=_json_safe(out["configs"]),
        data_files=hash_data_files(out["configs"], data_dir),
        lm_eval={key: _json_safe(out.get(key)) for key in ("versions", "n-shot", "config", "lm_eval_version")},
    )


def _benchmark(name: str) -> TextBenchmark:
    if name not in BENCHMARKS:
        raise InputError(f"unknown text benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def _leaves(out: dict, name: str) -> list[str]:
    children = out.get("group_subtasks", {}).get(name)
    if children is None:
        return [name]
    return [leaf for child in children for leaf in _leaves(out, child)]


def _stderr(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def request_kind(output_type: str) -> str:
    """The LM method a task's requests go to (lm-eval's multiple_choice asks loglikelihoods)."""
    return "loglikelihood" if output_type == "multiple_choice" else output_type


def score_failures_wrong(out: dict, failures: dict[str, str], tm: TaskManager, bootstrap_iters: int) -> None:
    """Score 0 every item with a failed request (`failures`: request hash -> reason, as backends
    record them) and re-aggregate its task and groups in `out` as lm-eval does; the item's sample
    gets "failure". lm-eval scored the placeholders like any output, and a placeholder can be
    right: four tied -inf loglikelihoods pick choice A."""
    if not failures:  # the usual case: no request hashes to compute here (collect_samples does)
        return
    failed_tasks = set()
    for task, items in out.get("samples", {}).items():
        kind = request_kind(out["configs"][task]["output_type"])
        for item in items:
            reasons = [failures[h] for h in _request_hashes(kind, item["arguments"]) if h in failures]
            if reasons:
                item["failure"] = reasons[0]
                _zero_scores(item, out["higher_is_better"].get(task, {}), task)
                failed_tasks.add(task)
    for task in failed_tasks:
        _reaggregate_task(out, task, bootstrap_iters)
    for group in out.get("group_subtasks", {}):
        if failed_tasks & set(_leaves(out, group)):
            _reaggregate_group(out, group, tm)


def _request_hashes(kind: str, arguments: list) -> list[str]:
    """One hash per request, in lm-eval's order, that of the item's resps: the i-th answers the i-th."""
    return [request_hash(kind, tuple(a)) for a in arguments]


def _zero_scores(item: dict, higher_is_better: dict[str, bool], task: str) -> None:
    for metric in item["metrics"]:
        if higher_is_better.get(metric) is not True:  # no worst value to give: refuse, never guess
            raise ValueError(f"{task}: cannot score a failed item on {metric!r}, which is not higher-is-better")
        item[metric] = 0.0


def _reaggregate_task(out: dict, task: str, bootstrap_iters: int) -> None:
    """A leaf task's metrics from its (corrected) samples: lm-eval's mean and its stderr."""
    aggregations = {m["metric"]: m.get("aggregation") for m in out["configs"][task].get("metric_list", [])}
    values: dict[tuple[str, str], list] = {}
    for item in out["samples"][task]:
        for metric in item["metrics"]:
            values.setdefault((metric, item["filter"]), []).append(item[metric])
    row = out["results"][task]
    for (metric, flt), items in values.items():
        if aggregations.get(metric) != "mean":
            raise ValueError(f"{task}: cannot re-aggregate metric {metric!r} (aggregation "
                             f"{aggregations.get(metric)!r}, not mean) after a failed item")
        stderr = stderr_for_metric(mean, bootstrap_iters) if len(items) > 1 else None
        row[f"{metric},{flt}"] = mean(items)
        row[f"{metric}_stderr,{flt}"] = stderr(items) if stderr else "N/A"


def _reaggregate_group(out: dict, group: str, tm: TaskManager) -> None:
    """A group's metrics from its leaf tasks' rows, as lm-eval's Group.aggregate."""
    config = load_yaml(tm.task_index[group].yaml_path, resolve_func=False)
    rows = [out["results"][leaf] for leaf in _leaves(out, group)]
    row = out["results"][group]
    for agg in config.get("aggregate_metric_list") or []:
        metric, by_size = agg["metric"], agg.get("weight_by_size", True)
        for flt in [k.split(",", 1)[1] for k in list(row) if k.split(",")[0] == metric]:
            have = [r for r in rows if f"{metric},{flt}" in r]
            sizes = [r["sample_len"] for r in have]
            row[f"{metric},{flt}"] = aggregate_subtask_metrics([r[f"{metric},{flt}"] for r in have], sizes, by_size)
            errors = [r.get(f"{metric}_stderr,{flt}") for r in have]
            if None in errors or "N/A" in errors:
                row[f"{metric}_stderr,{flt}"] = "N/A"
            elif by_size:
                row[f"{metric}_stderr,{flt}"] = pooled_sample_stderr(errors, sizes)
            else:
                row[f"{metric}_stderr,{flt}"] = unweighted_mean_stderr(errors)


def collect_metrics(out: dict) -> dict[str, dict[str, Any]]:
    """lm-eval's results table -> {"task/metric,filter": {"value", "stderr", "n"}} for tasks and groups."""
    n_docs = {task: counts["effective"] for task, counts in out["n-samples"].items()}
    metrics = {}
    for name, row in out["results"].items():
        n = sum(n_docs.get(leaf, 0) for leaf in _leaves(out, name))
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            metrics[f"{name}/{key}"] = {
                "value": float(value),
                "stderr": _stderr(row.get(f"{metric}_stderr,{flt}")),
                "n": n,
            }
    return metrics


def macro_mean(out: dict, group: str, key: str) -> dict[str, dict[str, Any]]:
    """Unweighted mean over the group's leaf tasks (e.g. the 57 MMLU subjects), beside lm-eval's micro mean."""
    leaves = _leaves(out, group)
    rows = [out["results"][leaf] for leaf in leaves]
    metric, flt = key.split(",", 1)
    values = [float(row[key]) for row in rows]
    errors = [_stderr(row.get(f"{metric}_stderr,{flt}")) for row in rows]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if None not in errors else None
    n = sum(out["n-samples"][leaf]["effective"] for leaf in leaves)
    return {f"{group}/{metric}_macro,{flt}": {"value": sum(values) / len(values), "stderr": stderr, "n": n}}


def collect_samples(out: dict) -> list[dict[str, Any]]:
    """One record per (task, item, filter): prompt, raw outputs, filtered output, target, scores."""
    records = []
    for task, items in out.get("samples", {}).items():
        metric_names = out["higher_is_better"].get(task, {})
        kind = request_kind(out["configs"][task]["output_type"])
        for item in items:
            arguments = _json_safe(item["arguments"])
            records.append(
                {
                    "task": task,
                    "doc_id": item["doc_id"],
                    "filter": item["filter"],
                    "prompt": arguments[0][0] if arguments and arguments[0] else None,
                    "arguments": arguments,
                    "resps": _json_safe(item["resps"]),
                    "filtered_resps": _json_safe(item["filtered_resps"]),
                    "target": _json_safe(item["target"]),
                    "scores": {m: _json_safe(item[m]) for m in metric_names if m in item},
                    "doc": _json_safe(item["doc"]),
                    "doc_hash": item.get("doc_hash"),
                    "prompt_hash": item.get("prompt_hash"),
                    "request_hashes": _request_hashes(kind, item["arguments"]),
                    "failure": item.get("failure"),  # set by score_failures_wrong
                }
            )
    return records


def hash_data_files(configs: dict[str, dict], data_dir: str | Path | None) -> dict[str, str]:
    """sha256 of every data file the evaluated tasks read."""
    paths = set()
    for cfg in configs.values():
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if files:
            paths.update(resolve_data_files(files, data_dir).values())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_serializable))


def _serializable(obj: Any) -> Any:
    """lm-eval's handle_non_serializable, but a function nested in a config (fewshot_config's
    samples, process_docs) is its source, as lm-eval gives a top-level one: its str() holds a
    memory address, so results.json differed from run to run of the same protocol."""
    if inspect.isfunction(obj):
        try:
            return inspect.getsource(obj)
        except (TypeError, OSError):
            return f"{obj.__module__}.{obj.__qualname__}"
    return handle_non_serializable(obj)
