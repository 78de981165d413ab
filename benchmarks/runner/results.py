"""results.json (versioned; see SCHEMA.md) and the plain-text results table."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path

from benchmarks.captioning.scoring import METRIC_NAMES as CAPTION_METRICS

SCHEMA_VERSION = 1
Z95 = 1.959963984540054


def metric_entry(value: float, stderr: float | None, n: int) -> dict:
    """A metric with its standard error and normal-approximation 95% CI."""
    value = float(value)
    ok = stderr is not None and isinstance(stderr, (int, float)) and math.isfinite(stderr)
    se = float(stderr) if ok else None
    ci = [value - Z95 * se, value + Z95 * se] if se is not None else None
    return {"value": value, "stderr": se, "ci95": ci, "n": int(n)}


def mean_entry(scores: list[float]) -> dict:
    """Mean of per-item scores with the standard error of the mean (sample std / sqrt(n))."""
    n = len(scores)
    if n == 0:
        return metric_entry(float("nan"), None, 0)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else None
    return metric_entry(mean, se, n)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("chameleon-bench", "torch", "transformers", "lm_eval", "pycocoevalcap", "tokenizers", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _replace_atomic(path: Path, write) -> None:
    """`write(file)` into path.tmp, then rename it over `path`; a failure (full disk, ^C) leaves
    `path` as it was and no .tmp behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_file():
            tmp.unlink()
        raise


def write_json_atomic(path: Path, obj) -> None:
    _replace_atomic(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()))


def write_jsonl_atomic(path: Path, records) -> str:
    """Write records and return the file's sha256."""
    h = hashlib.sha256()

    def write(f):
        for rec in records:
            line = (json.dumps(rec, sort_keys=True) + "\n").encode()
            h.update(line)
            f.write(line)

    _replace_atomic(path, write)
    return h.hexdigest()


REPO_ROOT = Path(__file__).resolve().parents[2]


def display_path(path: str | Path) -> str:
    """Repo-relative for shipped files (comparable across checkouts), absolute otherwise."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def headline_metrics(bench: dict) -> dict:
    """A benchmark's own metrics, without per-subtask rows (e.g. the 57 MMLU subjects)."""
    primary = bench.get("primary_metric")
    if not primary or "/" not in primary:
        return bench.get("metrics", {})
    task = primary.split("/", 1)[0] + "/"
    return {k: v for k, v in bench.get("metrics", {}).items() if k.startswith(task)}


def _fmt(x: float | None, pct: bool) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def format_metric(metric: str, m: dict) -> tuple[str, str]:
    """(value, half-width of the 95% CI) as the table and the summary line show them: accuracies in
    %, every caption metric (pycocoevalcap's names, Bleu_1..Bleu_4 alike) as results.json holds it
    (CIDEr 1.202, which papers print as 120.2)."""
    pct = metric not in CAPTION_METRICS and abs(m["value"]) <= 1
    half = None if m.get("ci95") is None else (m["ci95"][1] - m["ci95"][0]) / 2
    return _fmt(m["value"], pct), _fmt(half, pct)


def format_results_table(results: dict | str | Path) -> str:
    """Plain-text table of a results.json (dict or path): one row per headline metric of each benchmark."""
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    rows = [("benchmark", "metric", "value", "± 95% CI", "n", "failed")]
    for name, bench in results.get("benchmarks", {}).items():
        headline = headline_metrics(bench)
        if not headline:  # nothing scored: still show the benchmark and its failures
            rows.append((name, "-", "-", "-", str(bench.get("n_items", 0)), str(bench.get("n_failed", 0))))
        for metric, m in headline.items():
            rows.append((name, metric, *format_metric(metric, m), str(m["n"]), str(bench.get("n_failed", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    model = results.get("model", {})
    digest = str(model.get("fingerprint", "?")).rpartition(":")[2]  # without a prefix such as "responses:"
    head = f"suite {results.get('suite', {}).get('name', '?')}  model {model.get('backend', '?')}:" \
           f"{digest[:12]}  ({'complete' if results.get('complete') else 'INCOMPLETE'})"
    return head + "\n" + "\n".join(lines) + "\n"
