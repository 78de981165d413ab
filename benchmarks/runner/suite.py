"""Suites: declarative YAML files naming benchmarks and the protocol to run them with.

    name: smoke
    backend: chameleon          # default --backend
    seed: 0
    batch_size: 8
    benchmarks:
      - name: gsm8k_maj1        # key in results.json (unique)
        benchmark: gsm8k        # a text benchmark of benchmarks.text, or coco / flickr30k
        shots: 8                # default 0: zero-shot, not the task's own count
        k: 1                    # samples per item: maj@k (k > 1 needs sampling settings)
        limit: 20               # first N items (mmlu, math: per subject); null = all
        generation: {max_gen_toks: 256, temperature: 0.0}   # also top_p, top_k, do_sample, until,
                                # seed: of the k sampled solutions (default 0; the suite's `seed`
                                # seeds lm-eval and the caption exemplars, not the samples)
      - name: coco
        benchmark: coco         # captioning (coco | flickr30k)
        shots: 2
        references: coco_karpathy_test   # shipped set name or a local JSON (default per dataset)
        subset: with_images     # all (missing images reported as failures) | with_images
        metrics: [CIDEr]        # default [CIDEr]; also BLEU (Bleu_1..4), METEOR, ROUGE_L, SPICE
        exemplars: /data/karpathy/dataset_coco.json   # few-shot pool (default: the scored split,
        exemplar_split: train   # query excluded); split of a file with splits: Karpathy dataset_*.json
                                # or Flickr rows (default train; refused for a file without splits,
                                # which is used whole)
        exemplar_images: /data/coco/train2014         # its images (default: the run's images dir)

Validation is strict and happens before any model loads: unknown or duplicate keys, values of the
wrong type or out of range, unknown benchmarks and backends are errors that name the file, the
benchmark and the key (unknown keys also the allowed keys and the closest one).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from chameleon.errors import InputError

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
CAPTIONING = ("coco", "flickr30k")
SUITE_KEYS = {"name": str, "description": str, "backend": str, "seed": int, "batch_size": int, "benchmarks": list}
CAPTIONING_KEYS = {"references": str, "subset": str, "metrics": list,
                   "exemplars": str, "exemplar_split": str, "exemplar_images": str}
BENCH_KEYS = {"name": str, "benchmark": str, "shots": int, "k": int, "limit": (int, type(None)),
              "generation": dict, "description": str,
              "maj_at": list,  # text, k > 1: report maj@j for each j (default [k])
              **CAPTIONING_KEYS}
CAPTION_METRICS = ["CIDEr"]  # a captioning entry's `metrics` when left out: the paper's only caption metric
SUBSETS = ("all", "with_images")  # captioning: every reference item, or those whose image is present
GEN_KEYS = {"max_gen_toks": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
            "do_sample": bool, "until": list,
            "seed": int}  # sampling: each sample's stream comes from (this, its index, the prompt); default 0
# Allowed values of the keys above, checked after their types: (test, what is expected). The
# wording serves both a wrong type and a value out of range.
RANGES = {
    "seed": (lambda v: 0 <= v < 2**32, "an integer in 0..4294967295 (numpy's seed range, which lm-eval seeds)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "shots": (lambda v: v >= 0, "an integer >= 0"),
    "k": (lambda v: v >= 1, "an integer >= 1"),
    "limit": (lambda v: v is None or v >= 1, "an integer >= 1, or null for all items"),
    "maj_at": (lambda v: all(type(j) is int and j >= 1 for j in v), "a list of integers >= 1"),
    "metrics": (lambda v: bool(v) and all(isinstance(m, str) for m in v), f"a non-empty list of metric names (left out: {', '.join(CAPTION_METRICS)} alone)"),
    "max_gen_toks": (lambda v: v >= 1, "an integer >= 1"),
    "temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0: no top-k)"),
    "until": (lambda v: all(isinstance(x, str) and x for x in v), "a list of non-empty strings"),
}
# What a type is called in a YAML file (not Python's names: 'NoneType', 'dict')
TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "a mapping", type(None): "null"}
# A benchmark's name is the file name of its samples (samples/<name>.jsonl): no paths
SAFE_NAME = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,99}")  # no separators, no leading dot


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    benchmark: str
    shots: int = 0
    k: int = 1
    limit: int | None = None
    generation: dict = field(default_factory=dict)
    description: str = ""
    references: str | None = None  # captioning: shipped set name or JSON path (default per dataset)
    subset: str = "all"
    metrics: list = field(default_factory=lambda: list(CAPTION_METRICS))
    maj_at: list | None = None
    exemplars: str | None = None  # captioning: few-shot pool (shipped set name or JSON path)
    exemplar_split: str | None = None  # the pool's split, of a file with splits only (None: train)
    exemplar_images: str | None = None  # the pool's images (default: the scored images' directory)

    @property
    def kind(self) -> str:
        return "captioning" if self.benchmark in CAPTIONING else "text"


@dataclass(frozen=True)
class Suite:
    name: str
    path: str
    sha256: str
    benchmarks: tuple[BenchmarkSpec, ...]
    backend: str = "chameleon"
    seed: int = 0
    batch_size: int = 8
    description: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["benchmarks"] = [asdict(b) for b in self.benchmarks]
        return d


def _check_keys(obj: dict, allowed: dict, where: str) -> None:
    for key, value in obj.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise InputError(f"{where}: unknown key '{key}'{hint} (allowed: {', '.join(sorted(allowed))})")
        types = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        test, want = RANGES.get(key, (None, None))
        if not want:
            want = "a number" if types == (int, float) else " or ".join(TYPE_WORDS[t] for t in types)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or (test and not test(value)):
            raise InputError(f"{where}: '{key}' must be {want}, got {value!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (not
    last-wins). Checked as the document is composed, before merge keys (`<<: *anchor`) are expanded:
    a key that overrides a merged one is not a duplicate."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key_node.value!r}", key_node.start_mark)
            seen.add(key)
        return node


def resolve_suite_path(suite: str) -> Path:
    """A shipped suite name ("paper", "smoke") or a YAML path."""
    shipped = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    if not suite:  # (Path("") is the current directory)
        raise InputError(f"suite '': empty; expected a shipped suite ({', '.join(shipped)}) or a YAML file")
    path = Path(suite)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"suite {suite}: " + ("a directory; expected a suite YAML file" if path.is_dir() else "file not found"))
        return path
    if suite not in shipped:
        raise InputError(f"suite '{suite}': not a shipped suite ({', '.join(shipped)}) nor a YAML file")
    return SUITES_DIR / f"{suite}.yaml"


def load_suite(suite: str) -> Suite:
    from benchmarks.backends import BACKENDS
    from benchmarks.text.run import BENCHMARKS

    path = resolve_suite_path(suite)
    raw = path.read_bytes()
    try:
        data = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark and problem else ""
        detail = " ".join(str(problem or err).split())  # one line: a reader error (not text) spans several
        raise InputError(f"{path}: not valid YAML ({at}{detail})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    _check_keys(data, SUITE_KEYS, str(path))
    if data.get("backend", "chameleon") not in BACKENDS:
        raise InputError(f"{path}: 'backend' must be one of {', '.join(BACKENDS)}, got {data['backend']!r}")
    if not data.get("benchmarks"):
        raise InputError(f"{path}: 'benchmarks' must list at least one benchmark")
    specs, names = [], set()
    for i, b in enumerate(data["benchmarks"]):
        name = b.get("name") if isinstance(b, dict) else None
        where = f"{path}: benchmarks[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")  # find it in a long file
        if not isinstance(b, dict):
            raise InputError(f"{where}: expected a mapping")
        _check_keys(b, BENCH_KEYS, where)
        for req in ("name", "benchmark"):
            if req not in b:
                raise InputError(f"{where}: missing required key '{req}'")
        if not SAFE_NAME.fullmatch(b["name"]) or len(b["name"].encode()) > 200:  # file names are bytes-limited
            raise InputError(f"{where}: 'name' must be 1-100 characters (200 bytes) without '/', '\\' or control characters, "
                             f"not starting with '.' (it names samples/<name>.jsonl), got {b['name']!r}")
        where = f"{path}: benchmark '{b['name']}'"
        if b["name"].lower() in names:  # case-insensitive file systems would merge their samples files
            raise InputError(f"{where}: duplicate name (letter case aside: names become file names)")
        names.add(b["name"].lower())
        if b["benchmark"] not in (*BENCHMARKS, *CAPTIONING):
            close = difflib.get_close_matches(b["benchmark"], [*BENCHMARKS, *CAPTIONING], n=1)
            raise InputError(f"{where}: unknown benchmark {b['benchmark']!r}{f'; did you mean {close[0]!r}?' if close else ''}"
                             f" (one of {', '.join([*BENCHMARKS, *CAPTIONING])})")
        _check_keys(b.get("generation") or {}, GEN_KEYS, f"{where} generation")
        spec = BenchmarkSpec(**{**b, "generation": dict(b.get("generation") or {})})
        if spec.kind == "text":
            _check_text(spec, BENCHMARKS[spec.benchmark], b.keys() & CAPTIONING_KEYS.keys(), where)
        else:
            _check_captioning(spec, b.keys(), where)
        if spec.k > 1 and not (spec.generation.get("do_sample") and spec.generation.get("temperature", 1.0) > 0):
            raise InputError(f"{where}: k={spec.k} samples need generation.do_sample: true and temperature > 0")
        specs.append(spec)
    top = {k: v for k, v in data.items() if k != "benchmarks"}
    return Suite(name=top.pop("name", path.stem), path=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                 benchmarks=tuple(specs), **top)


def _check_text(spec: BenchmarkSpec, bench, captioning_keys: set, where: str) -> None:
    """What run_text_benchmark would refuse only after the model loads and --out is claimed."""
    if captioning_keys:
        raise InputError(f"{where}: {', '.join(sorted(captioning_keys))} apply to captioning ({', '.join(CAPTIONING)}) only")
    if spec.shots > bench.max_fewshot:
        raise InputError(f"{where}: 'shots' must be 0..{bench.max_fewshot} for {spec.benchmark}, got {spec.shots}")
    if spec.k > 1 and bench.sampled is None:
        raise InputError(f"{where}: {spec.benchmark} is scored by log-likelihood; 'k' must be 1, got {spec.k}")
    if spec.maj_at and (spec.k == 1 or max(spec.maj_at) > spec.k):
        raise InputError(f"{where}: 'maj_at' needs k > 1 and values in 1..k={spec.k}, got {spec.maj_at}")


def _check_captioning(spec: BenchmarkSpec, given: set, where: str) -> None:
    from benchmarks.captioning.scoring import resolve_metrics

    if spec.k != 1 or spec.maj_at:
        raise InputError(f"{where}: k and maj_at apply to text benchmarks only (one caption per image)")
    pool_keys = sorted({"exemplar_split", "exemplar_images"} & given)
    if pool_keys and not spec.exemplars:  # they describe the `exemplars` pool; alone they would be ignored
        raise InputError(f"{where}: {', '.join(pool_keys)} apply only with 'exemplars' (a few-shot pool file); "
                         "without it the shots come from the scored split and the run's images")
    if spec.exemplars and spec.shots == 0:  # a pool nothing is drawn from would be recorded, unread
        raise InputError(f"{where}: 'exemplars' (a few-shot pool) needs 'shots' >= 1; 0-shot prompts show no exemplars")
    if spec.subset not in SUBSETS:
        raise InputError(f"{where}: 'subset' must be one of {', '.join(SUBSETS)}, got {spec.subset!r}")
    try:
        resolve_metrics(spec.metrics)
    except InputError as err:
        raise InputError(f"{where}: 'metrics': {err}") from None
