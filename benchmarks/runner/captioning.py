"""Captioning benchmarks in the runner, on the captioning package's references, prompts and scorer.

Each item is one lm-eval `generate_until` request with lm-eval's multimodal convention (context
with `<image>` placeholders + `{"visual": [images]}`), so it goes through the same resumable,
sharded path as the text benchmarks. Items whose image is not in the images directory are
reported as failures (or left out under `subset: with_images`; results.json counts them in
`n_missing_images`), never guessed; a directory with none of the images is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from lm_eval.api.instance import Instance

from benchmarks.backends.base import IMAGE_PLACEHOLDER, FileImage, digest_images, instance_hash, parse_gen_kwargs
from benchmarks.captioning.prompts import CaptionSettings, build_prompt, postprocess_caption, prompt_images
from benchmarks.captioning.references import SHIPPED_COCO_IMAGES, load_references, reference_path, resolve_images
from benchmarks.captioning.scoring import METRIC_GROUPS, METRIC_NAMES, resolve_metrics, score_captions
from benchmarks.runner.results import display_path, mean_entry, metric_entry, sha256_file
from benchmarks.runner.suite import BenchmarkSpec
from chameleon.errors import InputError

DEFAULT_REFERENCES = {"coco": "coco_karpathy_test", "flickr30k": "flickr30k_karpathy_test"}
DEFAULT_IMAGES = {"coco": SHIPPED_COCO_IMAGES, "flickr30k": SHIPPED_COCO_IMAGES.parent / "flickr30k"}


def _render(segments) -> tuple[str, list]:
    text, images = "", []
    for seg in segments:
        if isinstance(seg, str):
            text += seg
        else:
            text += IMAGE_PLACEHOLDER
            images.append(seg)
    return text, images


def run_captioning(spec: BenchmarkSpec, lm, *, images_dir: Path | None, limit: int | None, seed: int) -> tuple[dict, list[dict]]:
    """Caption, score; return (benchmark entry for results.json, per-sample records)."""
    ref_source = spec.references or DEFAULT_REFERENCES[spec.benchmark]
    references = load_references(ref_source)
    items = references
    image_dir = Path(images_dir) if images_dir else DEFAULT_IMAGES[spec.benchmark]
    found, missing = find_images(spec, references, image_dir)
    if spec.subset == "with_images":
        items = [it for it in items if it.image_id in found]
    limit = min(x for x in (limit, spec.limit, len(items)) if x is not None)
    items = items[:limit]
    gen_kwargs = {"until": [], "max_gen_toks": 30, "do_sample": False, **spec.generation}
    settings = CaptionSettings(shots=spec.shots, max_new_tokens=int(gen_kwargs["max_gen_toks"]), seed=seed)
    pool, pool_images = exemplar_pool(spec, references=references, found=found, image_dir=image_dir)
    images_by_id = {**pool_images, **found}  # scored items win where ids coincide
    gen_hash = parse_gen_kwargs(gen_kwargs).digest()
    file_digest = functools.cache(sha256_file)  # shot images recur across items
    # Every prompt is built before the model runs, showing each file as one FileImage: read to hash
    # it (once, below) and whenever a backend encodes it, never held decoded meanwhile (2-shot COCO
    # test would hold ~5,000 photos, ~5.4 GiB, per process; a separate few-shot pool adds more).
    file_image = functools.cache(FileImage)
    ref_path = reference_path(ref_source)
    # What the scores depend on, for results.json: the references, the few-shot pool (its captions
    # are in every prompt), and below every image a prompt shows.
    data_files = {path: file_digest(path) for path in [ref_path] + ([reference_path(spec.exemplars)] if spec.exemplars else [])}

    requests, records, present = [], [], []
    for n, item in enumerate(items):
        item_hash = hashlib.sha256(json.dumps([spec.benchmark, str(item.image_id), item.references]).encode()).hexdigest()
        rec = {"benchmark": spec.name, "item_id": str(item.image_id), "item_hash": item_hash, "target": item.references,
               "generation_hash": gen_hash, "failed": False}
        if item.image_id not in found:
            rec.update(failed=True, failure=f"image {item.image_file} not found under {image_dir}", prompt=None,
                       images=[], output=None, prediction=None, score=None, request_hash=None)
            records.append(rec)
            continue
        query_file, shots = prompt_images(item, images_by_id, pool, settings)
        context, images = _render(build_prompt(query_file, shots, settings, load=file_image))
        files = [f for f, _ in shots] + [query_file]  # prompt order
        request = Instance("generate_until", {"image_id": item.image_id, "item_id": rec["item_id"]}, (context, gen_kwargs, {"visual": images}), 0, (spec.name, n, 1))
        requests.append(request)
        rec.update(prompt=context, request_hash=None, images=[{"file": display_path(f), "sha256": file_digest(f)} for f in files])
        data_files.update((f, file_digest(f)) for f in files)
        records.append(rec)
        present.append(rec)
    # reads each file: the slow part, shared by the processes of a torchrun job
    digest_images([image for request in requests for image in request.args[2]["visual"]], getattr(lm, "dist", None))
    for rec, request in zip(present, requests):
        rec["request_hash"] = instance_hash(request)
    outputs = lm.generate_until(requests) if requests else []
    preds = {}
    for rec, out in zip(present, outputs):
        rec["output"] = out
        failure = lm.failures.get(rec["request_hash"])
        # a failed request is scored as the empty caption (0 on every metric), whatever the placeholder
        rec["prediction"] = "" if failure else postprocess_caption(out)
        if failure:
            rec.update(failed=True, failure=failure)
        preds[rec["item_id"]] = rec["prediction"]
    metrics, skipped = {}, {}
    if preds:
        refs = {r["item_id"]: r["target"] for r in present}
        progress = getattr(lm, "progress", None)
        scores = score_captions(refs, preds, metrics=spec.metrics, progress=progress.status if progress else None)
        skipped = scores.skipped
        for rec in present:
            rec["score"] = scores.per_item[rec["item_id"]]
        for name, value in scores.corpus.items():
            se = mean_entry([scores.per_item[k][name] for k in preds])["stderr"]
            metrics[name] = metric_entry(value, se, len(preds))
    entry = {
        "benchmark": spec.benchmark, "kind": "captioning", "primary_metric": primary_metric(spec.metrics),
        "references": display_path(ref_path), "images_dir": display_path(image_dir), "n_items": len(records), "n_scored": len(preds),
        "n_missing_images": len(missing),  # of all the references; left out under subset with_images
        "n_failed": sum(r["failed"] for r in records), "metrics": metrics, "skipped_metrics": skipped,
        "generation": gen_kwargs, "generation_hash": gen_hash,
        "prompt": {"shots": settings.shots, "shot_template": settings.shot_template, "query_cue": settings.query_cue,
                   "exemplar_seed": settings.seed, "postprocess": "first line, first sentence",
                   "exemplar_pool": (f"{display_path(reference_path(spec.exemplars))} ({_pool_part(pool)})"
                                     if spec.exemplars else "the scored split, query excluded")},
        "data_files": data_files,
    }
    return entry, records


def primary_metric(metrics: list[str]) -> str | None:
    """The metrics key of the suite's first caption metric, which may name a group or be in any case:
    BLEU's headline is Bleu_4."""
    if not metrics:
        return None
    exact = {name.lower(): name for name in METRIC_NAMES}
    return exact.get(metrics[0].lower()) or METRIC_GROUPS[resolve_metrics(metrics[:1])[0]][-1]


def find_images(spec: BenchmarkSpec, references: list, image_dir: Path) -> tuple[dict, list]:
    """resolve_images, refusing a directory that holds none of the references' images: a wrong
    --images-dir would otherwise give a run with nothing scored that looks complete."""
    flag = f"pass --images-dir {spec.benchmark}=DIR with the {spec.benchmark} images"
    if not image_dir.is_dir():
        raise InputError(f"benchmark '{spec.name}': images directory {image_dir} does not exist; {flag}")
    found, missing = resolve_images(references, image_dir)
    if not found:
        raise InputError(f"benchmark '{spec.name}': images directory {image_dir} holds none of the {len(references)} "
                         f"images of its references (e.g. {references[0].image_file}); {flag}")
    return found, missing


def exemplar_pool(spec: BenchmarkSpec, *, references: list, found: dict, image_dir: Path) -> tuple[list, dict]:
    """The few-shot pool (items with an image) and its images: the suite's `exemplars` (e.g. Karpathy
    train, as the paper's protocol implies), or else the scored split itself (each query excluded
    from its own shots)."""
    if not spec.exemplars:
        pool = [it for it in references if it.image_id in found]
        if spec.shots and len(pool) <= spec.shots:  # each query is left out of its own shots
            raise InputError(f"benchmark '{spec.name}': {spec.shots}-shot prompts draw their exemplars from the scored "
                             f"split's items with an image, the query excluded: {len(pool)} have one, {spec.shots + 1} "
                             f"are needed (or name a pool with 'exemplars')")
        return pool, {}
    if spec.shots == 0:
        return [], {}
    pool_dir = Path(spec.exemplar_images) if spec.exemplar_images else image_dir
    items = load_references(spec.exemplars, split=spec.exemplar_split or "train")
    if spec.exemplar_split and all(it.split is None for it in items):  # it would be ignored: the whole file is the pool
        raise InputError(
            f"benchmark '{spec.name}': 'exemplar_split' {spec.exemplar_split!r} given, but exemplars file "
            f"{reference_path(spec.exemplars)} has no splits to select from (a Karpathy dataset_*.json and Flickr rows with a 'split' field have); leave "
            f"'exemplar_split' out to use the whole file as the pool"
        )
    pool_found, _ = resolve_images(items, pool_dir)
    pool = [it for it in items if it.image_id in pool_found]
    if len(pool) < spec.shots:
        raise InputError(
            f"benchmark '{spec.name}': exemplars {spec.exemplars} ({_pool_part(items)}) have {len(pool)} "
            f"item(s) with an image under {pool_dir}; {spec.shots}-shot prompts need at least {spec.shots}"
        )
    return pool, pool_found


def _pool_part(items: list) -> str:
    """Which part of the exemplars file the pool is, for results.json and errors."""
    if not items:
        return "no items"
    return f"{items[0].split} split" if items[0].split else "whole file: it has no splits"
