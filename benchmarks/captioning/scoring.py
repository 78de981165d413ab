"""Corpus-level caption metrics with pycocoevalcap's own scorers, arranged for speed.

Same numbers as `pycocoevalcap.eval.COCOEvalCap` (PTB tokenization, Bleu(4), METEOR 1.5,
ROUGE-L, CIDEr-D, SPICE), computed faster:
- references and predictions go through ONE PTBTokenizer (Java) call instead of two;
- the METEOR JVM is started first, so its ~5 s start (paraphrase table) overlaps tokenization,
  and it is fed all SCORE lines at once instead of one round trip per image;
- METEOR (and SPICE) run in Java while BLEU, ROUGE-L and CIDEr run in Python at the same time.
SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use; we never
download, so SPICE is reported as skipped (with the reason) unless those jars are installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pycocoevalcap
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from chameleon.errors import InputError

# pycocoevalcap is a namespace package (no __init__), hence __path__ rather than __file__.
PYCOCOEVALCAP_DIR = Path(list(pycocoevalcap.__path__)[0])
PTB_JAR = PYCOCOEVALCAP_DIR / "tokenizer" / "stanford-corenlp-3.4.1.jar"
METEOR_DIR = PYCOCOEVALCAP_DIR / "meteor"
SPICE_LIB = PYCOCOEVALCAP_DIR / "spice" / "lib"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

METRIC_GROUPS = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
METRIC_NAMES = tuple(name for names in METRIC_GROUPS.values() for name in names)

# Java's PTBTokenizer also breaks lines at these; pycocoevalcap only replaces "\n", which
# silently shifts every later caption onto the wrong image when one of the others occurs.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x85\u2028\u2029]")
_PUNCTUATION = frozenset(PUNCTUATIONS)

Progress = Callable[[str], None]


class JavaMissingError(InputError):
    """pycocoevalcap's tokenizer, METEOR and SPICE are Java programs."""


@dataclass
class CaptionScores:
    corpus: dict[str, float]
    per_item: dict[Hashable, dict[str, float]]
    skipped: dict[str, str] = field(default_factory=dict)


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(
            "caption scoring needs Java (pycocoevalcap's PTB tokenizer, METEOR and SPICE are Java "
            "programs) and no `java` is on PATH: install a JDK, e.g. `apt-get install "
            "openjdk-17-jre-headless`, or put its bin/ folder on PATH"
        )
    return java


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None. Never triggers pycocoevalcap's model download."""
    missing = [name for name in SPICE_CORENLP_JARS if not (SPICE_LIB / name).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP 3.6.0 models not installed ({', '.join(missing)} missing in "
            f"{SPICE_LIB}); SPICE would download them and this harness never downloads. Install "
            "them by running `python -m pycocoevalcap.spice.get_stanford_models` once online"
        )
    return None


def resolve_metrics(metrics: Sequence[str] | None) -> list[str]:
    """Metric groups to compute, from group or pycocoevalcap names (case-insensitive)."""
    if not metrics:
        return list(METRIC_GROUPS)
    lookup = {group.lower(): group for group in METRIC_GROUPS}
    lookup.update({name.lower(): group for group, names in METRIC_GROUPS.items() for name in names})
    lookup["rouge"] = "ROUGE_L"
    chosen = []
    for metric in metrics:
        group = lookup.get(metric.lower())
        if group is None:
            raise InputError(f"unknown caption metric {metric!r}; expected one of {', '.join(METRIC_GROUPS)}")
        if group not in chosen:
            chosen.append(group)
    return chosen


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (lower-cased, punctuation removed), all captions in one call."""
    java = java_executable()
    text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caption in captions)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as handle:
        handle.write(text)
    try:
        cmd = [java, "-XX:+UseSerialGC", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "utf-8", handle.name]
        done = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.remove(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(captions) or any(lines[len(captions):]):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION) for line in lines[: len(captions)]]


class _Meteor:
    """METEOR 1.5 over pycocoevalcap's jar and command line, fed in one batch.

    The protocol is pycocoevalcap's Meteor.compute_score: one SCORE line per image gives its
    statistics, then one EVAL line with all of them gives per-image scores and the corpus score.
    """

    def __init__(self, java: str):
        # SerialGC: same scores, ~1 s less CPU than the default G1 to load the paraphrase table
        cmd = [java, "-XX:+UseSerialGC", "-Xmx2G", "-jar", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, cwd=METEOR_DIR, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr)

    def _readline(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise RuntimeError(f"METEOR (java) stopped: {self._stderr.read().decode()[-2000:]}")
        return line.decode().strip()

    def score(self, refs: Sequence[list[str]], preds: Sequence[str]) -> tuple[float, list[float]]:
        def write_all():  # in a thread: the pipes would fill up if we wrote everything first
            for ref, pred in zip(refs, preds):
                hyp = pred.replace("|||", "").replace("  ", " ")
                line = " ||| ".join(("SCORE", " ||| ".join(r.replace("|||", "") for r in ref), hyp))
                self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()

        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        stats = [self._readline() for _ in preds]
        writer.join()
        self._proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        self._proc.stdin.flush()
        scores = [float(self._readline()) for _ in preds]
        return float(self._readline()), scores

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def _spice(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice  # only with the CoreNLP jars present: no download

    score, scores = Spice().compute_score(gts, res)
    return float(score), [float(s["All"]["f"]) for s in scores]


def check_ids(references: Mapping, predictions: Mapping) -> None:
    """Both sides must cover the same images: a partial run must not pass for a full one."""
    extra = [k for k in predictions if k not in references]
    missing = [k for k in references if k not in predictions]
    if not predictions:
        raise InputError("no predictions to score")
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} predicted image ids have no references (e.g. {extra[:5]})")
        if missing:
            parts.append(f"{len(missing)} reference images have no prediction (e.g. {missing[:5]})")
        raise InputError("; ".join(parts))
    bad_refs = [k for k, refs in references.items()
                if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs)]
    if bad_refs:
        raise InputError(f"{len(bad_refs)} images lack a non-empty list of reference strings (e.g. {bad_refs[:5]})")
    bad_preds = [k for k, pred in predictions.items() if not isinstance(pred, str)]
    if bad_preds:
        raise InputError(f"{len(bad_preds)} predictions are not strings (e.g. {bad_preds[:5]})")


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    metrics: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> CaptionScores:
    """Score one predicted caption per image against its references, COCOEvalCap-style.

    `metrics`: groups or names (BLEU, METEOR, ROUGE_L, CIDEr, SPICE; default all). Corpus scores
    use pycocoevalcap's names; `per_item[id]` has each image's scores (CIDEr there uses the
    corpus document frequencies, as in COCOEvalCap). CIDEr depends on the whole reference set.
    """
    say = progress or (lambda _msg: None)
    groups = resolve_metrics(metrics)
    check_ids(references, predictions)
    java = java_executable()
    skipped = {}
    if "SPICE" in groups and (reason := spice_unavailable_reason()):
        groups.remove("SPICE")
        skipped["SPICE"] = reason

    start = time.perf_counter()
    meteor = _Meteor(java) if "METEOR" in groups else None  # start the JVM before tokenizing
    try:
        ids = list(references)
        ref_lists = [list(references[k]) for k in ids]
        flat = [c for refs in ref_lists for c in refs] + [predictions[k] for k in ids]
        say(f"tokenizing {len(flat):,} captions ({len(ids):,} images)")
        tokens = ptb_tokenize(flat)
        gts, pos = {}, 0
        for k, refs in zip(ids, ref_lists):
            gts[k] = tokens[pos : pos + len(refs)]
            pos += len(refs)
        res = {k: [tokens[pos + i]] for i, k in enumerate(ids)}
        empty = [k for k in ids if not any(ref.strip() for ref in gts[k])]
        if empty:  # punctuation only: nothing to score against (and CIDEr fails on it)
            raise InputError(f"references of {len(empty)} image(s) are empty once tokenized (punctuation only), "
                             f"e.g. ids {empty[:5]}; expected caption text")

        corpus: dict[str, float] = {}
        per_item: dict[Hashable, dict[str, float]] = {k: {} for k in ids}

        def record(names: Sequence[str], score, scores) -> None:
            score, scores = ([score], [scores]) if len(names) == 1 else (score, scores)
            for name, total, items in zip(names, score, scores):
                corpus[name] = float(total)
                for k, s in zip(ids, items):
                    per_item[k][name] = float(s)

        with ThreadPoolExecutor(max_workers=2) as pool:
            java_jobs = {}
            if meteor is not None:
                java_jobs["METEOR"] = pool.submit(meteor.score, [gts[k] for k in ids], [res[k][0] for k in ids])
            if "SPICE" in groups:
                java_jobs["SPICE"] = pool.submit(_spice, gts, res)
            python_scorers = {"BLEU": lambda: Bleu(4).compute_score(gts, res, verbose=0),
                              "ROUGE_L": lambda: Rouge().compute_score(gts, res),
                              "CIDEr": lambda: Cider().compute_score(gts, res)}
            for group in groups:
                if group in python_scorers:
                    say(f"computing {group}")
                    record(METRIC_GROUPS[group], *python_scorers[group]())
            for group, job in java_jobs.items():
                say(f"waiting for {group} (java)")
                record(METRIC_GROUPS[group], *job.result())
    finally:
        if meteor is not None:
            meteor.close()
    say(f"scored {len(ids):,} images in {time.perf_counter() - start:.1f} s")
    order = [name for name in METRIC_NAMES if name in corpus]
    return CaptionScores(
        corpus={name: corpus[name] for name in order},
        per_item={k: {name: v[name] for name in order} for k, v in per_item.items()},
        skipped=skipped,
    )
