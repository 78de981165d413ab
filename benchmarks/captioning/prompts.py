"""k-shot interleaved captioning prompts, as in the Chameleon paper's COCO/Flickr30k evaluation.

A prompt is a list of segments, text and images interleaved in reading order:
    [shot image, "A photo of a cat on a bed.\n", shot image, "A photo of ...\n", query image, "A photo of"]
Chameleon's paper reports 2-shot captioning with greedy decoding cut at 30 tokens; the
generated continuation of the cue, trimmed by `postprocess_caption`, is the scored caption.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from benchmarks.captioning.references import CaptionItem
from chameleon.errors import InputError
from chameleon.vqgan import open_image

Segment = str | Image.Image


@dataclass(frozen=True)
class CaptionSettings:
    shots: int = 2
    max_new_tokens: int = 30  # greedy; the paper's 30-token cutoff
    shot_template: str = "A photo of {caption}\n"  # text after each exemplar image
    query_cue: str = "A photo of"  # text after the query image; the model continues it
    seed: int = 1234  # exemplar choice is seeded per query id

    def __post_init__(self):
        if self.shots < 0:
            raise InputError(f"caption shots must be >= 0, got {self.shots}")
        if self.max_new_tokens < 1:
            raise InputError(f"caption max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if "{caption}" not in self.shot_template:
            raise InputError(f"caption shot_template must contain '{{caption}}', got {self.shot_template!r}")


def exemplar_text(caption: str) -> str:
    """A reference written to follow the cue: 'A man rides.' -> 'a man rides.' (acronyms kept)."""
    text = " ".join(caption.split()).rstrip(" .")
    first = text.split(" ", 1)[0]
    if text and not (len(first) > 1 and first.isupper()):
        text = text[0].lower() + text[1:]
    return text + "."


def select_exemplars(query_id: Hashable, pool: Sequence[CaptionItem], settings: CaptionSettings) -> list[tuple[CaptionItem, str]]:
    """`settings.shots` (item, one of its references) pairs from `pool`, never the query itself.

    Seeded by (seed, query id), so a query gets the same shots whatever the run order or sharding.
    """
    candidates = [item for item in pool if item.image_id != query_id]
    if len(candidates) < settings.shots:
        raise InputError(f"{settings.shots}-shot captioning needs {settings.shots} exemplars besides the query; the pool has {len(candidates)}")
    rng = random.Random(f"{settings.seed}:{query_id}")
    return [(item, rng.choice(item.references)) for item in rng.sample(candidates, settings.shots)]


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """A file's image in its own mode: the model's preprocessing turns it to RGB as Meta does
    (transparency blended onto white, where a plain convert("RGB") would make it black)."""
    return image if isinstance(image, Image.Image) else open_image(image)


def build_prompt(query_image, exemplars: Sequence[tuple[Image.Image | str | Path, str]], settings: CaptionSettings,
                 load=load_image) -> list[Segment]:
    """Segments for one query: each exemplar's image and captioned template, then image and cue.
    `load`: makes a file the prompt's image (the runner's gives one `FileImage` per file, read when needed)."""
    segments: list[Segment] = []
    for image, caption in exemplars:
        segments += [load(image), settings.shot_template.format(caption=exemplar_text(caption))]
    return segments + [load(query_image), settings.query_cue]


def caption_prompt(item: CaptionItem, images: Mapping[Hashable, Path], pool: Sequence[CaptionItem],
                   settings: CaptionSettings = CaptionSettings()) -> list[Segment]:
    """The prompt for `item`, shots drawn from the `pool` items whose images are in `images`.

    Few-shot exemplars should come from a split other than the one scored (e.g. Karpathy train).
    """
    if item.image_id not in images:
        raise InputError(f"no image for caption item {item.image_id!r}")
    usable = [p for p in pool if p.image_id in images]
    return build_prompt(*prompt_images(item, images, usable, settings), settings)


def prompt_images(item: CaptionItem, images: Mapping[Hashable, Path], pool: Sequence[CaptionItem],
                  settings: CaptionSettings) -> tuple[Path, list[tuple[Path, str]]]:
    """The query's image and the shots' (image, caption) pairs, in `build_prompt`'s arguments'
    order; every item of `pool` must have its image in `images`."""
    shots = select_exemplars(item.image_id, pool, settings)
    return images[item.image_id], [(images[p.image_id], cap) for p, cap in shots]


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def postprocess_caption(generated: str) -> str:
    """The caption in a generated continuation: its first line, cut after the first sentence.

    Greedy decoding with a 30-token budget usually runs past the caption into the next
    "A photo of ..." shot or other text; the exemplars end each caption with ". " and a newline,
    so the first line's first sentence is the model's answer. Only '.', '!' or '?' followed by
    whitespace/end end a sentence ("3.5 m" survives; "Mr. Smith" would be cut, rare in captions).
    """
    line = generated.strip().split("\n", 1)[0].strip()
    match = _SENTENCE_END.search(line)
    return (line[: match.start() + 1] if match else line).strip()
