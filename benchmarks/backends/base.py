"""The one mixed-modal model interface every backend implements.

A backend is an lm-eval `LM` (loglikelihood, loglikelihood_rolling, generate_until) that also
accepts images: following lm-eval's multimodal convention, a request's args may carry a third
element `{"visual": [images]}` and its context the `<image>` placeholder where each goes. An image
is a PIL image, or a `FileImage`: a file decoded only when its pixels are needed (the runner's
captioning prompts). `generate_interleaved` returns mixed-modal output (text and images).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM, _multimodal_cache_default
from PIL import Image

from chameleon.chameleon import IMAGE_MARKER as IMAGE_PLACEHOLDER  # noqa: F401  (lm-eval's DEFAULT_IMAGE_PLACEHOLDER too)
from chameleon.chameleon import interleave
from chameleon.errors import InputError
from chameleon.vqgan import open_image

Segment = Any  # str | PIL.Image.Image | FileImage
_IMAGE_DIGEST = "_chameleon_bench_request_digest"  # what lm-eval hashes for an image, kept on the image object


class FileImage:
    """An image file a request shows, decoded each time its pixels are needed: once to hash it (the
    digest is kept) and when a backend encodes a prompt showing it. A captioning run builds every
    prompt before the model runs, and holding each photo decoded until then cost ~1.1 MB a photo per
    process (2-shot COCO test: ~5,000 photos, ~10,000 more from a separate few-shot pool)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.seen: tuple[int, int, int] | None = None  # (inode, size, mtime) when first seen

    def stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the file now; None where stat fails (open_image names why)."""
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def read(self) -> Image.Image:
        """The file's image in its own mode; an unreadable file, or one changed since its first read
        (its request hash and sample record describe that content), is an InputError naming it."""
        now = self.stamp()
        if self.seen is not None and now is not None and now != self.seen:
            raise InputError(f"{self.path}: image file changed during the run (its request hash is of the content "
                             f"read first); rerun the same command to resume with the new content")
        image = open_image(self.path)
        self.seen = self.seen or now
        return image

    def __repr__(self) -> str:
        return f"FileImage({str(self.path)!r})"


def pixels(image) -> Image.Image:
    """A request image as a PIL image."""
    return image.read() if isinstance(image, FileImage) else image


def known_digest(image) -> str | None:
    """An image's content digest where its request hash was computed already (always, under the runner)."""
    tagged = image.__dict__.get(_IMAGE_DIGEST) if isinstance(image, (Image.Image, FileImage)) else None
    return json.dumps(tagged, sort_keys=True) if tagged is not None else None  # lm-eval's {type tag: sha256}


@dataclass(frozen=True)
class GenSettings:
    """Decoding settings of one generate_until request, parsed from lm-eval's gen_kwargs."""

    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0.0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed"}


def _setting(kw: dict, key: str, default, convert, ok, expected: str):
    """kw[key] (else default) through `convert`, or an InputError naming the key and what it must be."""
    value = kw.get(key, default)
    try:
        out = None if isinstance(value, bool) and convert is not bool else convert(value)
    except (TypeError, ValueError):
        out = None
    if out is None or not ok(out):
        raise InputError(f"generation settings: {key} {value!r}: expected {expected}")
    return out


def _integer(value) -> int:
    """An integer setting as YAML, JSON or lm-eval's --gen_kwargs give it (3, 3.0, "3"); a fraction
    is refused rather than truncated."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().removeprefix("-").isdecimal()):
        return int(value)
    raise ValueError(value)


def parse_gen_kwargs(gen_kwargs: dict | None, default_max_gen_toks: int = 256) -> GenSettings:
    kw = dict(gen_kwargs or {})
    unknown = sorted(set(kw) - _GEN_KEYS)
    if unknown:
        raise InputError(f"generation settings: unknown key(s) {unknown}; allowed: {sorted(_GEN_KEYS)}")
    until = () if kw.get("until") is None else kw["until"]
    if isinstance(until, str):
        until = (until,)
    if not (isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until)):
        raise InputError(f"generation settings: until {kw['until']!r}: expected a string or a list of strings")
    key = "max_gen_toks" if "max_gen_toks" in kw or "max_new_tokens" not in kw else "max_new_tokens"
    max_toks = _setting(kw, key, default_max_gen_toks, _integer, lambda n: n >= 0, "an integer >= 0")
    # lm-eval's rule (normalize_gen_kwargs): without do_sample, a temperature above 0 samples
    do_sample = kw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise InputError(f"generation settings: do_sample {do_sample!r}: expected true or false")
    temperature = _setting(kw, "temperature", 1.0 if do_sample else 0.0, float, lambda t: 0 <= t < float("inf"), "a number >= 0")
    do_sample = temperature > 0 if do_sample is None else do_sample
    return GenSettings(
        until=tuple(s for s in until if s),  # an empty stop string (a task's "" delimiter) stops nothing
        max_gen_toks=max_toks, do_sample=do_sample and temperature > 0,
        temperature=temperature if do_sample else 0.0,
        top_p=_setting(kw, "top_p", 1.0, float, lambda p: 0 < p <= 1, "a number in (0, 1]"),
        top_k=_setting(kw, "top_k", 0, lambda k: _integer(k or 0), lambda k: k >= 0, "an integer >= 0"),
        seed=_setting(kw, "seed", 0, _integer, lambda n: True, "an integer"),
    )


def request_hash(kind: str, args: tuple) -> str:
    """lm-eval's own cache key (`hash_args`: images hashed by content), so our records align with
    its cache. Computed as `hash_args` computes it, except that each image object's digest is kept
    on the object: lm-eval PNG-encodes an image to hash it (~65 ms for a COCO photo, 20x its JPEG
    decoding), and captioning prompts share one object per file (2-shot COCO test: 15,000 image
    slots, at most 5,000 files). Tested equal to `hash_args`."""
    return hashlib.sha256(json.dumps([kind] + list(args), default=_hash_default).encode("utf-8")).hexdigest()


def _hash_default(obj):
    if not isinstance(obj, (Image.Image, FileImage)):
        return _multimodal_cache_default(obj)
    digest = obj.__dict__.get(_IMAGE_DIGEST)
    if digest is None:  # (PIL images are never changed in place here: loaded, then only read)
        digest = obj.__dict__[_IMAGE_DIGEST] = _pixels_digest(obj)
    return digest


def _pixels_digest(image):
    """What lm-eval's `hash_args` puts in a request's key for an image: a digest of its PNG encoding
    (a FileImage's is its PIL image's). PNG cannot hold CMYK, YCbCr or PA images, which the model
    takes and on which hash_args fails; theirs is a digest of mode, size and pixel bytes."""
    image = pixels(image)
    try:
        return _multimodal_cache_default(image)
    except OSError:
        raw = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
        if image.palette is not None:  # a PA image's pixels are indices into its palette
            raw.update(f"{image.palette.mode}\n".encode() + image.palette.tobytes())
        raw.update(image.tobytes())
        return {"__pil_image_pixels_sha256__": raw.hexdigest()}


def digest_images(images, dist=None) -> None:
    """Compute the request-hash digests of these images ahead, in threads (Pillow's decoders and
    PNG encoder release the GIL: 2x on this 2-core machine). `request_hash` then finds each on its
    image. Under torchrun (`dist`, the runner's `Dist`; every process passes the same images in
    the same order) each process computes a contiguous share with its share of the cores and the
    processes exchange them. An unreadable file raises its InputError, the first in order, in
    every process, without reading the files after it in that share."""
    todo = list({id(im): im for im in images if isinstance(im, (Image.Image, FileImage)) and _IMAGE_DIGEST not in im.__dict__}.values())
    for image in todo:  # every process, its share or not: a file changed after this is refused when read
        if isinstance(image, FileImage) and image.seen is None:
            image.seen = image.stamp()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    share = [len(todo) * r // world for r in range(world + 1)]
    mine = todo[share[rank]:share[rank + 1]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(len(mine), cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    digests, error = [], None
    pool = ThreadPoolExecutor(workers)
    try:
        for digest in pool.map(_pixels_digest, mine):
            digests.append(digest)
    except InputError as err:
        error = (share[rank] + len(digests), str(err))
    finally:
        pool.shutdown(cancel_futures=True)
    listing = hashlib.sha256(repr([str(im.path) if isinstance(im, FileImage) else None for im in todo]).encode()).hexdigest()
    parts = dist.all_gather((listing, digests, error)) if dist is not None else [(listing, digests, error)]
    if any(other != listing for other, _, _ in parts):  # a bug, not bad input
        raise RuntimeError("digest_images: the processes were given different images")
    for r, (_, got, _) in enumerate(parts):
        for image, digest in zip(todo[share[r]:], got):
            image.__dict__[_IMAGE_DIGEST] = digest
    errors = [e for _, _, e in parts if e is not None]
    if errors:
        raise InputError(min(errors)[1])


def sample_seed(settings: GenSettings, sample_index: int) -> int:
    """Seed of the sample_index-th sampled generation; backends mix in the prompt per row."""
    h = hashlib.sha256(f"{settings.seed}:{sample_index}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def instance_hash(req, kind: str | None = None) -> str:
    """`request_hash` of an lm-eval Instance (as a request of `kind`, by default its own type),
    computed once per instance: the runner, its cache layer and the backends all ask, and hashing
    encodes the request's images."""
    kind = kind or req.request_type
    known = req.__dict__.setdefault("_request_hashes", {})
    if kind not in known:
        known[kind] = request_hash(kind, req.args)
    return known[kind]


def item_id(req) -> str:
    """The item_id of a request's sample record: the runner's captioning requests carry it in their
    doc (the image id), lm-eval's text requests are "<task>/<doc_id>"."""
    doc = req.doc if isinstance(req.doc, dict) else {}
    return doc["item_id"] if isinstance(doc.get("item_id"), str) else f"{req.task_name}/{req.doc_id}"


def sample_indices(requests: list) -> list[int]:
    """Occurrence number of each request among identical ones (lm-eval repeats for maj@k)."""
    seen: dict[str, int] = {}
    out = []
    for req in requests:
        h = instance_hash(req)
        out.append(seen.get(h, 0))
        seen[h] = out[-1] + 1
    return out


def to_segments(context: str, aux: dict | None) -> list[Segment]:
    """Split an lm-eval context on `<image>` placeholders and interleave the request's images."""
    images = list((aux or {}).get("visual") or [])
    if not images:
        return [context] if context else []
    return interleave(context, images, source="request")


def truncate_at_stops(text: str, until: tuple[str, ...]) -> str:
    """lm-eval semantics: the output ends before the first stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class MixedModalLM(LM):
    """Base of our backends: lm-eval LM + images in, text and images out."""

    MULTIMODAL = True  # lm-eval: may run multimodal tasks
    backend_name = "base"
    # Set by a caller that shows progress itself (the suite runner: one bar per benchmark): called
    # with the number of requests just finished; while it is set the backend draws no bars.
    progress_hook = None

    def progress_bar(self, total: int, desc: str, disable: bool = False, leave: bool = True):
        """The backend's own tqdm bar, off while a progress_hook reports to the caller."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=leave, disable=disable or self.progress_hook is not None)

    def report_progress(self, n: int) -> None:
        if self.progress_hook is not None and n:
            self.progress_hook(n)

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, str] = {}  # request hash -> reason; the runner counts them

    @property
    def tokenizer_name(self) -> str:
        # lm-eval reads this only for --apply_chat_template (LM's own says "please implement it")
        raise InputError("--apply_chat_template: these models have no chat template; run without it")

    # Why this backend takes no image input from its model (None: it does), for the runner to refuse
    # a suite with captioning before any benchmark runs rather than when it reaches one.
    image_problem: str | None = None

    @classmethod
    def checkpoint_image_problem(cls, pretrained) -> str | None:
        """`image_problem` as far as the model's files tell, before loading it."""
        return None

    def unused_inputs(self, request_hashes: set[str], item_ids: set[str]) -> str | None:
        """What the backend was given that no request of a run asked for (a responses file's lines),
        as a warning; None where nothing was."""
        return None

    # identity of the weights + config: keys caches, stamps results
    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What results.json records about the model."""
        return {"backend": self.backend_name, "fingerprint": self.fingerprint}

    def generate_interleaved(self, prompts: list[list[Segment]], settings: GenSettings,
                             mode: str = "interleaved") -> list[list[Segment]]:
        raise InputError(f"backend '{self.backend_name}' cannot produce mixed-modal (image) output")

    # generate_until with explicit per-request sample indices (seeds), used by the runner when it
    # hands a backend only part of a list (resume, shards); lm-eval calls generate_until(requests).
    def generate_until(self, requests, sample_index: list[int] | None = None) -> list[str]:  # noqa: D102
        raise NotImplementedError

