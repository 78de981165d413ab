"""`chameleon-bench score-captions`: COCO caption metrics for any COCO-format results file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.captioning.references import SHIPPED, load_references, reference_path
from benchmarks.captioning.scoring import METRIC_GROUPS, resolve_metrics, score_captions
from chameleon.errors import InputError, refuse_empty_paths, unicode_problem

DESCRIPTION = """\
Score generated captions against references with pycocoevalcap (PTB tokenizer, BLEU-1..4,
METEOR, ROUGE-L, CIDEr; SPICE only when its Stanford CoreNLP 3.6.0 jars are installed, else
reported as skipped). Needs Java. Prints the metrics as JSON keyed by pycocoevalcap's names
(Bleu_1 .. Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE).

Every reference image must have a prediction unless --subset is given (CIDEr's document
frequencies, and so its scores, depend on the reference set scored)."""

EXAMPLE = """\
example:
  chameleon-bench score-captions \\
      --annotations benchmarks/data/coco_caption_demo/captions_val2014_fakecap1000_refs.derived.json \\
      --results benchmarks/data/coco_caption_demo/captions_val2014_fakecap_results.json --out metrics.json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score-captions", help="score COCO-format caption results (BLEU, METEOR, ROUGE-L, CIDEr, SPICE)",
        description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, metavar="REFS",
                        help="references: a COCO annotation JSON (images, annotations), a Karpathy "
                             "test file (COCO or Flickr30k), Karpathy's dataset_*.json (test split), "
                             f"or a shipped set: {', '.join(SHIPPED)}")
    parser.add_argument("--results", required=True, metavar="PREDS",
                        help="COCO results JSON: a list of {\"image_id\": ..., \"caption\": \"...\"}, one per image")
    parser.add_argument("--out", metavar="METRICS", help="also write the metrics JSON here")
    parser.add_argument("--per-item", metavar="JSONL",
                        help="write each image's scores, one JSON object per line (for paired comparisons)")
    parser.add_argument("--metrics", nargs="+", action="extend", metavar="NAME",  # repeated: all of them
                        help=f"metrics to compute (default all): {' '.join(METRIC_GROUPS)}")
    parser.add_argument("--subset", action="store_true",
                        help="score only the reference images that have a prediction (as coco-caption's "
                             "example does) instead of failing on missing ones")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    parser.set_defaults(func=run)


def load_results(path: Path) -> dict:
    """{image_id: caption} from a COCO results file; errors name the file, row and field."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--results {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--results {path}: not a readable JSON file ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"--results {path}: expected a non-empty JSON list of {{image_id, caption}} objects")
    results, rows_by_id = {}, {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image_id" not in row or "caption" not in row:
            raise InputError(f"{path}: row {i}: expected an object with fields 'image_id' and 'caption', got {row!r:.80}")
        image_id, caption = row["image_id"], row["caption"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise InputError(f"{path}: row {i}: field 'image_id' must be an integer or string, got {image_id!r}")
        if not isinstance(caption, str):
            raise InputError(f"{path}: row {i}: field 'caption' must be a string, got {caption!r:.80}")
        if problem := unicode_problem(caption):
            raise InputError(f"{path}: row {i}: field 'caption' is not valid Unicode text ({problem})")
        first = rows_by_id.setdefault(str(image_id), i)  # "1" and 1 name the same image (match_ids)
        if first != i:
            raise InputError(f"{path}: row {i}: image_id {image_id!r} has a second caption (row {first} has "
                             f"image_id {rows[first]['image_id']!r}); expected one per image")
        results[image_id] = caption
    return results


def match_ids(references: dict, results: dict, results_path: Path) -> dict:
    """Results keyed like the references; "391895" and 391895 name the same image."""
    by_text = {str(k): k for k in references}
    matched = {}
    unknown = []
    for image_id, caption in results.items():
        key = by_text.get(str(image_id))
        if key is None:
            unknown.append(image_id)
        else:
            matched[key] = caption
    if unknown:
        raise InputError(f"{results_path}: {len(unknown)} image_ids are not in the references (e.g. {unknown[:5]})")
    return matched


def check_outputs(args) -> None:
    """Refuse, before scoring, output paths that would overwrite an input or cannot be written."""
    taken = {"--results": args.results.resolve(), "--annotations": reference_path(args.annotations).resolve()}
    for flag, path in (("--out", args.out), ("--per-item", args.per_item)):
        if path is None:
            continue
        resolved = path.resolve()
        clash = next((other for other, p in taken.items() if p == resolved), None)
        if clash:
            raise InputError(f"{flag} {path}: is also the {clash} file and would be overwritten; choose another path")
        if path.is_dir():
            raise InputError(f"{flag} {path}: is a directory; expected a file path to write")
        parent = next(p for p in resolved.parents if p.exists())  # created when missing
        if not parent.is_dir():
            raise InputError(f"{flag} {path}: {parent} is a file, not a directory")
        if not os.access(path if path.exists() else parent, os.W_OK):
            raise InputError(f"{flag} {path}: not writable")
        if parent == resolved.parent and not path.exists():  # os.access says yes to root: try it
            try:
                path.open("a").close()
                path.unlink()
            except OSError as err:
                raise InputError(f"{flag} {path}: cannot be written ({err.strerror or err})") from None
        taken[flag] = resolved


def run(args) -> int:
    refuse_empty_paths(("--annotations", args.annotations), ("--results", args.results),
                       ("--out", args.out), ("--per-item", args.per_item))  # Path("") is the current directory
    args.results, args.out, args.per_item = (None if p is None else Path(p) for p in (args.results, args.out, args.per_item))
    progress = None if args.quiet else (lambda msg: print(f"score-captions: {msg}", file=sys.stderr, flush=True))
    if args.metrics:  # before any file is read or Java started
        try:
            resolve_metrics(args.metrics)
        except InputError as err:
            raise InputError(f"--metrics: {err}") from None
    check_outputs(args)
    items = load_references(args.annotations, what="--annotations")
    references = {item.image_id: item.references for item in items}
    predictions = match_ids(references, load_results(args.results), args.results)
    missing = [k for k in references if k not in predictions]
    if missing and not args.subset:
        raise InputError(
            f"{args.results}: {len(missing):,} reference images have no prediction (e.g. {missing[:5]}); "
            f"--annotations {args.annotations} has {len(references):,}. Pass --subset to score only the predicted "
            "images (CIDEr then differs from a full-set score), or give every reference image a caption")
    if missing:
        if progress:
            progress(f"--subset: scoring the {len(predictions):,} of {len(references):,} reference images that have predictions")
        references = {k: v for k, v in references.items() if k in predictions}
    scores = score_captions(references, predictions, metrics=args.metrics, progress=progress)
    for name, reason in scores.skipped.items():
        print(f"score-captions: {name} skipped: {reason}", file=sys.stderr)
    text = json.dumps(scores.corpus, indent=2)
    print(text)  # first: the scores are shown even if a file below cannot be written
    for flag, path in (("--out", args.out), ("--per-item", args.per_item)):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as handle:
                if flag == "--out":
                    handle.write(text + "\n")
                else:
                    for image_id, values in scores.per_item.items():
                        handle.write(json.dumps({"image_id": image_id, **values}) + "\n")
        except OSError as err:
            raise InputError(f"{flag} {path}: cannot be written ({err.strerror or err}); the metrics are printed above") from None
    return 0
