"""Suites: declarative YAML files naming benchmarks and the protocol to run them with.

    name: smoke
    backend: chameleon          # default --backend
    seed: 0
    batch_size: 8
    benchmarks:
      - name: gsm8k_maj1        # key in results.json (unique)
        benchmark: gsm8k        # a text benchmark of benchmarks.text, or coco / flickr30k
        shots: 8
        k: 1                    # samples per item: maj@k (k > 1 needs sampling settings)
        limit: 20               # first N items; null = all
        generation: {max_gen_toks: 256, temperature: 0.0}
      - name: coco
        benchmark: coco         # captioning (coco | flickr30k)
        shots: 2
        references: coco_karpathy_test   # shipped set name or a local JSON (default per dataset)
        subset: with_images     # all (missing images reported as failures) | with_images
        metrics: [CIDEr]
        exemplars: /data/karpathy/dataset_coco.json   # few-shot pool (default: the scored split,
        exemplar_split: train   # query excluded); split of a Karpathy dataset_*.json (train)
        exemplar_images: /data/coco/train2014         # its images (default: the run's images dir)

Validation is strict: unknown keys are errors that name the key, the file, the allowed keys and
the closest one.
"""

from __future__ import annotations

import difflib
import hashlib
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
SUBSETS = ("all", "with_images")  # captioning: every reference item, or those whose image is present
GEN_KEYS = {"max_gen_toks": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
            "do_sample": bool, "until": list}


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
    metrics: list = field(default_factory=lambda: ["CIDEr"])
    maj_at: list | None = None
    exemplars: str | None = None  # captioning: few-shot pool (shipped set name or JSON path)
    exemplar_split: str = "train"  # the pool's split when it is a Karpathy dataset_*.json
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
        types = allowed[key]
        if not isinstance(value, types) or (isinstance(value, bool) and types in (int, (int, float))):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise InputError(f"{where}: '{key}' must be {want}, got {value!r}")


def resolve_suite_path(suite: str) -> Path:
    """A shipped suite name ("paper", "smoke") or a YAML path."""
    path = Path(suite)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"suite {suite}: file not found")
        return path
    shipped = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    if suite not in shipped:
        raise InputError(f"suite '{suite}': not a shipped suite ({', '.join(shipped)}) nor a YAML file")
    return SUITES_DIR / f"{suite}.yaml"


def load_suite(suite: str) -> Suite:
    path = resolve_suite_path(suite)
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    _check_keys(data, SUITE_KEYS, str(path))
    if not data.get("benchmarks"):
        raise InputError(f"{path}: 'benchmarks' must list at least one benchmark")
    specs, names = [], set()
    for i, b in enumerate(data["benchmarks"]):
        where = f"{path}: benchmarks[{i}]"
        if not isinstance(b, dict):
            raise InputError(f"{where}: expected a mapping")
        _check_keys(b, BENCH_KEYS, where)
        for req in ("name", "benchmark"):
            if req not in b:
                raise InputError(f"{where}: missing required key '{req}'")
        where = f"{path}: benchmark '{b['name']}'"
        if b["name"] in names:
            raise InputError(f"{where}: duplicate name")
        names.add(b["name"])
        _check_keys(b.get("generation") or {}, GEN_KEYS, f"{where} generation")
        spec = BenchmarkSpec(**{**b, "generation": dict(b.get("generation") or {})})
        if spec.k < 1 or spec.shots < 0 or (spec.limit is not None and spec.limit < 1):
            raise InputError(f"{where}: expected k >= 1, shots >= 0, limit >= 1 or null")
        if spec.k > 1 and not (spec.generation.get("do_sample") and spec.generation.get("temperature", 1.0) > 0):
            raise InputError(f"{where}: k={spec.k} samples need generation.do_sample: true and temperature > 0")
        if spec.kind == "text" and CAPTIONING_KEYS.keys() & b.keys():
            raise InputError(f"{where}: {', '.join(sorted(CAPTIONING_KEYS.keys() & b.keys()))} apply to captioning ({', '.join(CAPTIONING)}) only")
        if spec.subset not in SUBSETS:
            raise InputError(f"{where}: subset must be one of {', '.join(SUBSETS)}, got {spec.subset!r}")
        specs.append(spec)
    top = {k: v for k, v in data.items() if k != "benchmarks"}
    return Suite(name=top.pop("name", path.stem), path=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                 benchmarks=tuple(specs), **top)
