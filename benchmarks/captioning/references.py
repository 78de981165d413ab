"""Reference captions for MS-COCO and Flickr30k, from the shipped copies or user files.

Formats understood (detected from the content):
- Karpathy COCO test as shipped: `[{image: "val2014/COCO_val2014_%012d.jpg", caption: [..]}]`
- Flickr30k Karpathy test as shipped: `[{split, image_name, captions: [..]}]`, filtered to `split`
  where rows have one
- COCO annotation files (`captions_val2014.json`): `{images: [{id, file_name}], annotations: [{image_id, caption}]}`,
  each image id once (an identical repeat of an entry is accepted)
- Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`: `{images: [{filename, sentences, split, ..}]}`,
  filtered to `split` ("test" by default; "restval" counts as train, in both split-carrying formats).
Hub dataset names are not loaded: everything here works offline from local files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chameleon.errors import InputError, unicode_problem

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {
    "coco_karpathy_test": DATA_DIR / "coco_karpathy_test" / "coco_test.json",
    "flickr30k_karpathy_test": DATA_DIR / "flickr30k_karpathy_test" / "flickr30k_test.json",
    "coco_caption_demo": DATA_DIR / "coco_caption_demo" / "captions_val2014_fakecap1000_refs.derived.json",
}
SHIPPED_COCO_IMAGES = DATA_DIR / "images" / "coco"

# COCO file names end in the 12-digit zero-padded id: COCO_val2014_000000391895.jpg, 000000039769.png
_COCO_ID = re.compile(r"(?:^|_)(\d{12})\.(?:jpe?g|png)$", re.IGNORECASE)


@dataclass(frozen=True)
class CaptionItem:
    image_id: str | int
    image_file: str  # relative name as the source gives it, e.g. "val2014/COCO_val2014_000000391895.jpg"
    references: list[str]
    split: str | None = None  # of a Karpathy dataset_*.json; None: the file has no splits


def coco_id_from_filename(name: str) -> int | None:
    match = _COCO_ID.search(Path(name).name)
    return int(match.group(1)) if match else None


def reference_path(source: str | Path) -> Path:
    """The file of a shipped set (by name), or the local path given."""
    return SHIPPED.get(str(source), Path(source))


def load_references(source: str | Path = "coco_karpathy_test", split: str = "test",
                    what: str = "caption references") -> list[CaptionItem]:
    """Items of a shipped set (by name) or of a local JSON file, in file order; `what` names the
    source in errors (a command line's flag)."""
    path = reference_path(source)
    if path.is_dir():
        raise InputError(f"{what} {str(source)!r}: is a directory; expected a JSON file")
    if not path.is_file():
        raise InputError(
            f"{what} {str(source)!r}: no such file; expected a local JSON file or one of "
            f"{', '.join(SHIPPED)} (hub datasets are not downloaded: pass a local copy)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and "annotations" in data:
        items = _from_coco_annotations(path, data)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        items = _from_karpathy_dataset(path, data["images"], split)
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "image_name" in data[0]:
        items = _from_flickr_rows(path, data, split)
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
        items = [_karpathy_coco_row(path, i, row) for i, row in enumerate(data)]
    else:
        raise InputError(
            f"{path}: unknown caption reference format; expected a COCO annotation file "
            "({images, annotations}), a Karpathy dataset_*.json ({images: [{filename, sentences}]}), "
            "or a non-empty list of {image, caption} (COCO Karpathy test) or {image_name, captions} "
            "(Flickr30k Karpathy test) rows"
        )
    _check_unique(path, items)
    return items


def _captions(path: Path, where: str, field: str, value) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise InputError(f"{path}: {where}: field {field!r} must be a non-empty list of non-empty strings, got {value!r:.80}")
    for j, caption in enumerate(value):
        _reference_text(path, f"{where}: field {field!r}[{j}]", caption)
    return value


def _reference_text(path: Path, where: str, text: str) -> None:
    """A reference the scorers can use: words after PTB tokenization, which drops punctuation (a
    blank or punctuation-only reference would score nothing, and CIDEr fails when all are), and
    text its tokenizer can encode."""
    if problem := unicode_problem(text):
        raise InputError(f"{path}: {where} is not valid Unicode text ({problem})")
    if not any(ch.isalnum() for ch in text):
        raise InputError(f"{path}: {where} has no words ({text!r:.40}); expected caption text")


def _field(path: Path, where: str, row, field: str, kind: type | tuple[type, ...]):
    if not isinstance(row, dict):
        raise InputError(f"{path}: {where}: expected an object, got {type(row).__name__}")
    if field not in row:
        raise InputError(f"{path}: {where}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, kind) or isinstance(value, bool) or value == "":
        raise InputError(f"{path}: {where}: field {field!r} has a bad value {value!r:.80}")
    return value


def _karpathy_coco_row(path: Path, i: int, row) -> CaptionItem:
    image = _field(path, f"row {i}", row, "image", str)
    coco_id = coco_id_from_filename(image)
    if coco_id is None:
        raise InputError(f"{path}: row {i}: field 'image' {image!r} is not a COCO file name like val2014/COCO_val2014_%012d.jpg")
    return CaptionItem(coco_id, image, list(_captions(path, f"row {i}", "caption", row.get("caption"))))


def _split_wanted(split: str) -> set[str]:
    # Karpathy's "restval" images (the rest of COCO val2014) are training images: his train split
    # of 113,287 COCO images is train + restval.
    return {"train", "restval"} if split == "train" else {split}


def _from_flickr_rows(path: Path, rows: list, split: str) -> list[CaptionItem]:
    """Rows `{split, image_name, captions}`; where rows carry a split (all or none must), those of
    `split`, else all of them."""
    with_split = [isinstance(row, dict) and "split" in row for row in rows]
    if any(with_split) and not all(with_split):
        raise InputError(f"{path}: row {with_split.index(False)}: missing field 'split' (other rows have one; "
                         "expected it in every row or in none)")
    has_split, wanted, items = any(with_split), _split_wanted(split), []
    for i, row in enumerate(rows):
        if has_split and _field(path, f"row {i}", row, "split", str) not in wanted:
            continue
        name = _field(path, f"row {i}", row, "image_name", str)
        stem = Path(name).stem
        image_id = int(stem) if stem.isdigit() else stem  # results files use the numeric Flickr id
        items.append(CaptionItem(image_id, name, list(_captions(path, f"row {i}", "captions", row.get("captions"))),
                                 split if has_split else None))
    if not items:
        raise InputError(f"{path}: no rows with split {split!r} (splits there: {sorted({row['split'] for row in rows})})")
    return items


def _from_coco_annotations(path: Path, data: dict) -> list[CaptionItem]:
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise InputError(f"{path}: fields 'images' and 'annotations' must both be lists")
    files, first = {}, {}
    for i, image in enumerate(images):
        image_id = _field(path, f"images[{i}]", image, "id", (int, str))
        j = first.setdefault(str(image_id), i)  # "1" and 1 are one image to results files
        if j != i:  # a repeat was merged silently, the last file_name winning; an identical one says nothing new
            if image == images[j]:
                continue
            raise InputError(f"{path}: images[{i}]: image id {image_id!r} appears twice (also images[{j}], "
                             f"{images[j]!r:.80}); expected one entry per image id")
        files[image_id] = image.get("file_name") or str(image_id)
    captions: dict = {image_id: [] for image_id in files}
    for i, ann in enumerate(annotations):
        image_id = _field(path, f"annotations[{i}]", ann, "image_id", (int, str))
        caption = _field(path, f"annotations[{i}]", ann, "caption", str)
        _reference_text(path, f"annotations[{i}]: field 'caption'", caption)
        if image_id not in captions:
            raise InputError(f"{path}: annotations[{i}]: image_id {image_id!r} is not in 'images'")
        captions[image_id].append(caption)
    bare = [k for k, v in captions.items() if not v]
    if bare:
        raise InputError(f"{path}: {len(bare)} images have no caption annotations (e.g. ids {bare[:5]})")
    return [CaptionItem(k, files[k], v) for k, v in captions.items()]


def _from_karpathy_dataset(path: Path, images: list, split: str) -> list[CaptionItem]:
    wanted = _split_wanted(split)
    items = []
    for i, image in enumerate(images):
        if _field(path, f"images[{i}]", image, "split", str) not in wanted:
            continue
        name = _field(path, f"images[{i}]", image, "filename", str)
        sentences = _field(path, f"images[{i}]", image, "sentences", list)
        raws = [s.get("raw") if isinstance(s, dict) else None for s in sentences]
        refs = _captions(path, f"images[{i}]", "sentences[].raw", raws)
        image_id = image.get("cocoid", Path(name).stem)
        image_id = int(image_id) if str(image_id).isdigit() else image_id
        folder = image.get("filepath")
        items.append(CaptionItem(image_id, f"{folder}/{name}" if folder else name, list(refs), split))
    if not items:
        raise InputError(f"{path}: no images with split {split!r}")
    return items


def _check_unique(path: Path, items: list[CaptionItem]) -> None:
    seen: dict[str, CaptionItem] = {}
    for item in items:
        key = str(item.image_id)  # "1" and 1 are one image to results files (score-captions' match_ids)
        if key in seen:  # (named by file: a position among the items of one split is no row number)
            raise InputError(f"{path}: image id {item.image_id!r} appears twice ({seen[key].image_file!r} and "
                             f"{item.image_file!r}); expected one entry per image")
        seen[key] = item


def _shipped_index(image_dir: Path) -> dict[int, Path]:
    """The shipped image folders' index.json maps COCO ids to files with any naming."""
    index = image_dir / "index.json"
    if not index.is_file():
        return {}
    try:
        rows = json.loads(index.read_text(encoding="utf-8"))
        return {int(r["coco_id"]): image_dir / r["file"] for r in rows if "coco_id" in r}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{index}: expected a list of {{file, coco_id}} objects ({err})") from None


def resolve_images(items: Iterable[CaptionItem], image_dir: str | Path = SHIPPED_COCO_IMAGES) -> tuple[dict, list]:
    """Map image ids to files under `image_dir`; return (found {id: Path}, missing [ids]).

    Tried in order: the item's relative path, its base name, the folder's index.json, then any
    file whose name ends in the same zero-padded COCO id (val2014 and 2017 naming). Nothing fuzzy.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise InputError(f"image directory {str(image_dir)!r} does not exist or is not a directory")
    by_id = _shipped_index(root)
    for file in root.iterdir():
        coco_id = coco_id_from_filename(file.name)
        if coco_id is not None:
            by_id.setdefault(coco_id, file)
    found, missing = {}, []
    for item in items:
        candidates = [root / item.image_file, root / Path(item.image_file).name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None and isinstance(item.image_id, int):
            hit = by_id.get(item.image_id)
        if hit is None:
            missing.append(item.image_id)
        else:
            found[item.image_id] = hit
    return found, missing
