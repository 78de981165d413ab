"""Captioning: references, prompts, pycocoevalcap scoring (real Java scorers) and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.captioning.commands import load_results
from benchmarks.captioning.prompts import CaptionSettings, caption_prompt, exemplar_text, postprocess_caption, select_exemplars
from benchmarks.captioning.references import CaptionItem, load_references, resolve_images
from benchmarks.captioning.scoring import JavaMissingError, score_captions, spice_unavailable_reason
from chameleon.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "benchmarks" / "data" / "coco_caption_demo"
DEMO_REFS = DEMO / "captions_val2014_fakecap1000_refs.derived.json"
DEMO_RESULTS = DEMO / "captions_val2014_fakecap_results.json"
KARPATHY_TEST_IDS_SHIPPED = {199551, 199553, 199764, 199783}  # the shipped photos in the Karpathy test split
NAMES = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


class _SpiceNotRun(Exception):
    pass


class _NoSpice:
    """Stands in for SPICE only: its CoreNLP models would be downloaded. Stops COCOEvalCap after CIDEr."""

    def method(self):
        return "SPICE"

    def compute_score(self, gts, res):
        raise _SpiceNotRun


def coco_eval_cap(monkeypatch) -> tuple[dict, dict]:
    """pycocoevalcap's own COCOEvalCap on the demo files, as in coco-caption's example."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    coco = COCO(str(DEMO_REFS))
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(DEMO_RESULTS)))
    with pytest.raises(_SpiceNotRun):
        evaluator.evaluate()  # every other metric is stored before SPICE's turn
    return evaluator.eval, evaluator.imgToEval


def test_demo_scores_equal_coco_eval_cap(monkeypatch):
    items = load_references(DEMO_REFS)
    ours = score_captions({i.image_id: i.references for i in items}, load_results(DEMO_RESULTS))
    corpus, per_image = coco_eval_cap(monkeypatch)

    assert list(ours.corpus) == NAMES
    assert ours.corpus == pytest.approx({k: corpus[k] for k in NAMES}, rel=1e-12, abs=1e-12)
    assert set(ours.per_item) == set(per_image) and len(per_image) == 1000
    for image_id, scores in per_image.items():
        assert ours.per_item[image_id] == pytest.approx({k: scores[k] for k in NAMES}, rel=1e-9, abs=1e-12)
    if spice_unavailable_reason():  # the normal case here: no CoreNLP 3.6.0 models, no download
        assert "SPICE" not in ours.corpus and "CoreNLP" in ours.skipped["SPICE"]
    else:
        assert "SPICE" in ours.corpus


def test_edge_captions_score_without_misalignment():
    refs = {1: ["A dog runs on grass.", "a brown dog"], 2: ["Two cats sleep on a bed.", "cats sleeping"],
            3: ["A café with tables.", "a small cafe"]}
    # empty, punctuation-only and a Unicode line separator (Java breaks lines at it) must not shift rows
    scores = score_captions(refs, {1: "", 2: "...", 3: "A café\u2028with tables."}, metrics=["BLEU", "rouge", "CIDEr"])
    assert scores.per_item[1]["ROUGE_L"] == 0.0 and scores.per_item[2]["Bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert scores.per_item[3]["Bleu_1"] == pytest.approx(1.0) and scores.per_item[3]["ROUGE_L"] > 0.9
    assert scores.skipped == {}


def test_score_inputs_checked(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="1 predicted image ids have no references"):
        score_captions({1: ["a cat"]}, {1: "a cat", 2: "a dog"})
    with pytest.raises(InputError, match="1 reference images have no prediction"):
        score_captions({1: ["a cat"], 2: ["a dog"]}, {1: "a cat"})
    with pytest.raises(InputError, match="1 images lack a non-empty list of reference strings"):
        score_captions({1: "a cat"}, {1: "a cat"})
    with pytest.raises(InputError, match="1 predictions are not strings"):
        score_captions({1: ["a cat"]}, {1: None})
    with pytest.raises(InputError, match="unknown caption metric 'BLEURT'"):
        score_captions({1: ["a cat"]}, {1: "a cat"}, metrics=["BLEURT"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    with pytest.raises(JavaMissingError, match="install a JDK"):
        score_captions({1: ["a cat"]}, {1: "a cat"}, metrics=["CIDEr"])


def test_shipped_references_load():
    coco = load_references()
    assert len(coco) == 5000 and sum(len(i.references) for i in coco) == 25010
    assert coco[0] == CaptionItem(391895, "val2014/COCO_val2014_000000391895.jpg", coco[0].references)
    flickr = load_references("flickr30k_karpathy_test")
    assert len(flickr) == 1000 and all(len(i.references) == 5 for i in flickr)
    assert flickr[0].image_id == 1007129816 and flickr[0].image_file == "1007129816.jpg"
    demo = load_references("coco_caption_demo")
    assert len(demo) == 1000 and sum(len(i.references) for i in demo) == 5005


def test_karpathy_dataset_json(tmp_path):
    path = tmp_path / "dataset_coco.json"
    rows = [{"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "test",
             "sentences": [{"raw": "A cat."}, {"raw": "A kitten."}]},
            {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "cocoid": 7, "split": "train",
             "sentences": [{"raw": "A dog."}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000009.jpg", "cocoid": 9, "split": "restval",
             "sentences": [{"raw": "A bird."}]}]
    path.write_text(json.dumps({"images": rows, "dataset": "coco"}))
    assert load_references(path) == [CaptionItem(42, "val2014/COCO_val2014_000000000042.jpg", ["A cat.", "A kitten."], "test")]
    # Karpathy's train split is train + restval
    assert [(i.image_id, i.split) for i in load_references(path, split="train")] == [(7, "train"), (9, "train")]
    assert [i.image_id for i in load_references(path, split="restval")] == [9]


def test_flickr_rows_filtered_by_their_split(tmp_path):
    """Rows `{split, image_name, captions}` (the shipped Flickr30k test's format) of a file holding
    several splits: those of the split asked for (train with restval); every row or none must say."""
    path = tmp_path / "flickr30k.json"
    rows = [{"split": s, "image_name": f"{i}.jpg", "captions": ["A dog runs."]} for i, s in enumerate(["train", "test", "val", "restval", "test"])]
    path.write_text(json.dumps(rows))
    assert [(i.image_id, i.split) for i in load_references(path)] == [(1, "test"), (4, "test")]
    assert [(i.image_id, i.split) for i in load_references(path, split="train")] == [(0, "train"), (3, "train")]
    path.write_text(json.dumps(rows[:2] + [{"image_name": "9.jpg", "captions": ["A cat."]}]))
    with pytest.raises(InputError, match=r"row 2: missing field 'split' \(other rows have one"):
        load_references(path)
    path.write_text(json.dumps(rows[:1]))
    with pytest.raises(InputError, match=r"no rows with split 'test' \(splits there: \['train'\]\)"):
        load_references(path)
    path.write_text(json.dumps([{"image_name": "5.jpg", "captions": ["A cat."]}]))  # no splits: the whole file
    assert [(i.image_id, i.split) for i in load_references(path)] == [(5, None)]
    assert {i.split for i in load_references("coco_karpathy_test")} == {None}  # a file without splits


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a"]}, {"image": "val2014/COCO_val2014_000000000002.jpg"}],
         r"row 1: field 'caption' must be a non-empty list"),
        ([{"image": "val2014/cat.jpg", "caption": ["a"]}], r"row 0: field 'image' 'val2014/cat.jpg' is not a COCO file name"),
        ([{"split": "test", "image_name": "1.jpg", "captions": "a dog"}], r"row 0: field 'captions' must be a non-empty list"),
        ([{"split": "test", "image_name": "1.jpg", "captions": ["a"]}, {"split": "test", "image_name": "1.jpg", "captions": ["b"]}],
         r"image id 1 appears twice \('1.jpg' and '1.jpg'\); expected one entry per image"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]},
         r"annotations\[0\]: image_id 2 is not in 'images'"),
        ({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}, r"annotations\[0\]: missing field 'caption'"),
        ({"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "x"}]}, r"1 images have no caption annotations"),
        ({"foo": 1}, r"unknown caption reference format"),
        ({"images": [{"id": 1}, {"id": "1"}], "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": "1", "caption": "y"}]},
         r"images\[1\]: image id '1' appears twice \(also images\[0\], \{'id': 1\}\)"),  # one image to a results file
        # a repeated id with another file was merged, the last file_name winning
        ({"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8}, {"id": 7, "file_name": "b.jpg"}],
          "annotations": [{"image_id": 7, "caption": "x"}, {"image_id": 8, "caption": "y"}]},
         r"refs\.json: images\[2\]: image id 7 appears twice \(also images\[0\], \{'id': 7, 'file_name': 'a\.jpg'\}\); "
         r"expected one entry per image id"),
        # JSON's lone surrogate, which the scorers' PTB tokenizer cannot encode
        ([{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a", "a \ud800 cat"]}],
         r"row 0: field 'caption'\[1\] is not valid Unicode text \(surrogates not allowed: '\\ud800' at character 2\)"),
        ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "\udfff"}]},
         r"annotations\[0\]: field 'caption' is not valid Unicode text"),
        ({"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "x\ud800"}]}]},
         r"images\[0\]: field 'sentences\[\].raw'\[0\] is not valid Unicode text"),

        # a reference with no words scores nothing (and CIDEr fails when every reference is so)
        ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "   "}]}, r"annotations\[0\]: field 'caption' has no words"),
        ([{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a cat", "..."]}],
         r"row 0: field 'caption'\[1\] has no words \('\.\.\.'\); expected caption text"),
    ],
)
def test_malformed_references(tmp_path, content, message):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=message) as err:
        load_references(path)
    assert str(path) in str(err.value)


def test_repeated_identical_coco_image_entry_is_one_image(tmp_path):
    """An images entry repeated unchanged describes the same image: one item, all its captions."""
    path = tmp_path / "refs.json"
    image = {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 480}
    path.write_text(json.dumps({"images": [image, {"id": 5}, dict(image)],
                                "annotations": [{"image_id": 42, "caption": "A cat."}, {"image_id": 5, "caption": "A dog."},
                                                {"image_id": 42, "caption": "A kitten."}]}))
    assert load_references(path) == [CaptionItem(42, "COCO_val2014_000000000042.jpg", ["A cat.", "A kitten."]),
                                     CaptionItem(5, "5", ["A dog."])]


def test_unreadable_references(tmp_path):
    with pytest.raises(InputError, match="coco_karpathy_tset.*coco_karpathy_test"):
        load_references("coco_karpathy_tset")
    with pytest.raises(InputError, match=r"caption references '.*': is a directory; expected a JSON file"):
        load_references(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        load_references(bad)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"image_id": 1, "caption": "x"}, "expected a non-empty JSON list"),
        ([{"image_id": 1, "caption": "x"}, {"caption": "y"}], "row 1: expected an object with fields 'image_id' and 'caption'"),
        ([{"image_id": 1, "caption": ["x"]}], "row 0: field 'caption' must be a string"),
        ([{"image_id": 1.5, "caption": "x"}], "row 0: field 'image_id' must be an integer or string"),
        ([{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}], "row 1: image_id 1 has a second caption"),
        ([{"image_id": 1, "caption": "x"}, {"image_id": "1", "caption": "y"}],
         r"preds.json: row 1: image_id '1' has a second caption \(row 0 has image_id 1\)"),
        ([{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "a \ud800 cat"}],  # JSON's lone surrogate
         r"preds.json: row 1: field 'caption' is not valid Unicode text \(surrogates not allowed: '\\ud800' at character 2\)"),
    ],
)
def test_malformed_results(tmp_path, content, message):
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        load_results(path)


def test_missing_images_reported(tmp_path):
    found, missing = resolve_images(load_references("coco_karpathy_test"))
    assert set(found) == KARPATHY_TEST_IDS_SHIPPED and all(p.is_file() for p in found.values())
    assert len(missing) == 4996 and not KARPATHY_TEST_IDS_SHIPPED & set(missing)
    # 2017-style names (zero-padded id only) resolve by COCO id; nothing else is guessed
    Image.new("RGB", (4, 4)).save(tmp_path / "000000391895.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "391896.jpg")
    items = [CaptionItem(391895, "val2014/COCO_val2014_000000391895.jpg", ["a"]),
             CaptionItem(391896, "val2014/COCO_val2014_000000391896.jpg", ["b"])]
    found, missing = resolve_images(items, tmp_path)
    assert found == {391895: tmp_path / "000000391895.jpg"} and missing == [391896]
    with pytest.raises(InputError, match="image directory"):
        resolve_images(items, tmp_path / "nope")


def test_two_shot_prompt_structure():
    items = load_references("coco_karpathy_test")
    images, _ = resolve_images(items)
    pool = [i for i in items if i.image_id in images]
    query = pool[0]
    settings = CaptionSettings()
    assert (settings.shots, settings.max_new_tokens) == (2, 30)
    segments = caption_prompt(query, images, pool, settings)
    assert [type(s) for s in segments[::2]] == [Image.Image] * 3 and all(isinstance(s, str) for s in segments[1::2])
    assert all(s.startswith("A photo of ") and s.endswith(".\n") for s in segments[1:4:2]) and segments[-1] == "A photo of"
    shots = select_exemplars(query.image_id, pool, settings)
    assert query.image_id not in [item.image_id for item, _ in shots]
    assert shots == select_exemplars(query.image_id, pool, settings)  # seeded, repeatable
    assert all(caption in item.references for item, caption in shots)
    assert segments[1] == f"A photo of {exemplar_text(shots[0][1])}\n"
    zero = caption_prompt(query, images, pool, CaptionSettings(shots=0, query_cue="Caption:"))
    assert len(zero) == 2 and zero[1] == "Caption:"
    with pytest.raises(InputError, match="needs 4 exemplars besides the query; the pool has 3"):
        caption_prompt(query, images, pool, CaptionSettings(shots=4))
    with pytest.raises(InputError, match="shot_template must contain"):
        CaptionSettings(shot_template="Photo:")


def test_postprocess_caption():
    assert postprocess_caption(" a cat on a bed. A photo of a dog") == "a cat on a bed."
    assert postprocess_caption("a man holding a 3.5 m pole\nA photo of") == "a man holding a 3.5 m pole"
    assert postprocess_caption("two dogs playing!") == "two dogs playing!"
    assert postprocess_caption("\n\n") == ""
    assert exemplar_text("A man riding a horse .") == "a man riding a horse."
    assert exemplar_text("NYC skyline at night") == "NYC skyline at night."


def cli_main(argv):
    from benchmarks.cli import main

    return main(argv)


def test_cli_score_captions(tmp_path, capsys):
    out, per_item = tmp_path / "m" / "metrics.json", tmp_path / "items.jsonl"
    argv = ["score-captions", "--annotations", str(DEMO_REFS), "--results", str(DEMO_RESULTS),
            "--out", str(out), "--per-item", str(per_item), "--metrics", "BLEU", "CIDEr"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = score_captions({i.image_id: i.references for i in load_references(DEMO_REFS)},
                              load_results(DEMO_RESULTS), metrics=["BLEU", "CIDEr"])
    assert printed == json.loads(out.read_text()) == expected.corpus
    rows = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert len(rows) == 1000 and rows[0] == {"image_id": 404464, **expected.per_item[404464]}

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(json.loads(DEMO_RESULTS.read_text())[:10]))
    assert cli_main(argv[:4] + [str(partial), "--metrics", "CIDEr"]) == 2
    err = capsys.readouterr().err
    assert f"{partial}: 990 reference images have no prediction" in err and "Pass --subset" in err
    assert cli_main(argv[:4] + [str(partial), "--metrics", "CIDEr", "--subset", "--quiet"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"CIDEr"}
    assert cli_main(["score-captions", "--annotations", "coco_karpathy_test", "--results", str(DEMO_RESULTS)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(DEMO_RESULTS) in err and "not in the references" in err
    assert cli_main(argv[:5] + ["--metrics", "CIDEX", "--out", str(tmp_path / "never.json")]) == 2  # before any file is read
    assert capsys.readouterr().err.startswith("error: --metrics: unknown caption metric 'CIDEX'")
    assert not (tmp_path / "never.json").exists()


def test_cli_score_captions_refuses_a_repeated_image_id(tmp_path, capsys):
    """The shipped demo references with one images entry repeated under another file name: exit 2
    naming the file and the id, nothing written (it was merged silently)."""
    refs = json.loads(DEMO_REFS.read_text())
    first = refs["images"][0]
    refs["images"].append({**first, "file_name": "elsewhere.jpg"})
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(refs))
    out = tmp_path / "metrics.json"
    assert cli_main(["score-captions", "--annotations", str(path), "--results", str(DEMO_RESULTS), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: images[{len(refs['images']) - 1}]: image id {first['id']} appears twice "
                          "(also images[0], "), err
    assert not out.exists()


def test_cli_subprocess_exit_codes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.cli", "score-captions", "--annotations", "coco_caption_demo", "--quiet"]
    ok = subprocess.run(cmd + ["--results", str(DEMO_RESULTS), "--metrics", "ROUGE_L"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    expected = score_captions({i.image_id: i.references for i in load_references(DEMO_REFS)},
                              load_results(DEMO_RESULTS), metrics=["ROUGE_L"])
    assert json.loads(ok.stdout) == expected.corpus
    bad = tmp_path / "preds.json"
    bad.write_text('[{"image_id": 404464}]')
    failed = subprocess.run(cmd + ["--results", str(bad)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert f"error: {bad}: row 0: expected an object with fields 'image_id' and 'caption'" in failed.stderr


def test_cli_score_captions_output_paths_checked_first(tmp_path, capsys, monkeypatch):
    """--out / --per-item that would overwrite an input or cannot be written are refused before scoring."""
    import benchmarks.captioning.commands as commands

    monkeypatch.setattr(commands, "score_captions", lambda *a, **k: pytest.fail("scored before checking outputs"))
    refs, preds = tmp_path / "refs.json", tmp_path / "preds.json"
    refs.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a cat"}]}))
    preds.write_text('[{"image_id": 1, "caption": "a cat"}]')
    base = ["score-captions", "--annotations", str(refs), "--results", str(preds)]
    (tmp_path / "dir").mkdir()
    for flags, message in [
        (["--out", str(tmp_path / "dir" / ".." / "preds.json")], "is also the --results file"),
        (["--per-item", str(refs)], "is also the --annotations file"),
        (["--out", str(tmp_path / "m.json"), "--per-item", str(tmp_path / "m.json")], "is also the --out file"),
        (["--out", str(tmp_path / "dir")], "is a directory"),
        (["--per-item", str(preds / "items.jsonl")], f"{preds} is a file, not a directory"),
    ]:
        assert cli_main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (flags, err)
    assert json.loads(preds.read_text()) == [{"image_id": 1, "caption": "a cat"}] and "annotations" in refs.read_text()


def test_cli_score_captions_empty_paths_named(tmp_path, capsys):
    """An empty path (an unset shell variable) is refused naming its flag; Path("") was the current
    directory ('--results .: not a readable JSON file', "caption references '': is a directory")."""
    base = {"--annotations": str(DEMO_REFS), "--results": str(DEMO_RESULTS)}
    for flag in ["--annotations", "--results", "--out", "--per-item"]:
        argv = ["score-captions"] + [x for k, v in {**base, flag: ""}.items() for x in (k, v)]
        assert cli_main(argv) == 2, flag
        assert capsys.readouterr().err == f"error: {flag}: empty path\n", flag


def test_cli_score_captions_bad_annotations_named(tmp_path, capsys):
    assert cli_main(["score-captions", "--annotations", str(tmp_path), "--results", str(DEMO_RESULTS)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --annotations {str(tmp_path)!r}: is a directory")


def test_captioning_images_dir_without_any_image_refused(tmp_path):
    from benchmarks.runner.captioning import run_captioning
    from benchmarks.runner.suite import BenchmarkSpec

    spec = BenchmarkSpec(name="coco", benchmark="coco", subset="with_images", limit=1, metrics=["BLEU"])
    with pytest.raises(InputError, match=rf"images directory {re.escape(str(tmp_path))} holds none of the 5000 images .*"
                                         r"e\.g\. val2014/COCO_val2014_000000391895\.jpg.*--images-dir coco=DIR"):
        run_captioning(spec, None, images_dir=tmp_path, limit=None, seed=0)  # no model needed: refused first
    with pytest.raises(InputError, match=r"images directory .*nope does not exist"):
        run_captioning(spec, None, images_dir=tmp_path / "nope", limit=None, seed=0)

    class Echo:  # a model whose every caption is "a cat"
        failures: dict = {}

        def generate_until(self, requests):
            return ["a cat"] * len(requests)

    name = "COCO_val2014_000000199551.jpg"
    (tmp_path / name).write_bytes((ROOT / "benchmarks/data/images/coco" / name).read_bytes())
    entry, records = run_captioning(spec, Echo(), images_dir=tmp_path, limit=None, seed=0)
    assert (entry["n_items"], entry["n_scored"], entry["n_missing_images"]) == (1, 1, 4999)  # dropped, but counted


def test_responses_captions_keyed_by_the_samples_item_id(tmp_path, capsys):
    """A caption response is found by the item_id the samples file records (the image id, not a
    position that shifts with limits); a missing one's failure names that id; response lines that
    no request used are reported once, as a warning."""
    from benchmarks.backends import load_backend
    from benchmarks.runner import load_suite, run_suite

    found, _ = resolve_images(load_references("coco_karpathy_test"), ROOT / "benchmarks/data/images/coco")
    ids = [str(it.image_id) for it in load_references("coco_karpathy_test") if it.image_id in found][:3]
    suite = tmp_path / "cap.yaml"
    suite.write_text("name: cap\nbenchmarks:\n  - {name: coco, benchmark: coco, shots: 0, subset: with_images, limit: 3}\n")
    lines = [{"item_id": ids[0], "output": "A cat on a couch."}, {"item_id": ids[1], "output": "A dog.\nMore."},
             {"item_id": "coco/2", "output": "A bus."}, {"request_hash": "f" * 64, "output": "x"}]
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = run_suite(load_suite(str(suite)), load_backend("responses", str(responses)), tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run/samples/coco.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in records] == ids and res["benchmarks"]["coco"]["n_failed"] == 1
    assert [r["prediction"] for r in records[:2]] == ["A cat on a couch.", "A dog."]
    assert records[2]["failed"] and records[2]["failure"].endswith(f"(item {ids[2]})")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {responses}: 2 response line(s) matched no request of this run (line 3: item_id "
                        f"'coco/2'; line 4: request_hash '{'f' * 64}'): keys are the samples files' request_hash or "
                        "item_id (the image id for captioning)"]


def test_cli_score_captions_unwritable_outputs_and_repeated_metrics(tmp_path, capsys, monkeypatch):
    """An --out / --per-item that cannot be created is refused before scoring where the directory is
    there (os.access says yes to root, so the file is tried), and at writing otherwise, after the
    metrics are printed; never a traceback. A repeated --metrics adds to the list."""
    import benchmarks.captioning.commands as commands

    asked, real = [], commands.score_captions  # (the real scorers run; what they are asked for is noted)
    monkeypatch.setattr(commands, "score_captions", lambda refs, preds, metrics=None, progress=None:
                        asked.append(metrics) or real(refs, preds, metrics=metrics, progress=progress))
    refs, preds = tmp_path / "refs.json", tmp_path / "preds.json"
    refs.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a cat on a mat"}]}))
    preds.write_text('[{"image_id": 1, "caption": "a cat on a mat"}]')
    base = ["score-captions", "--annotations", str(refs), "--results", str(preds), "--quiet"]
    assert cli_main(base + ["--metrics", "BLEU", "--metrics", "CIDEr", "ROUGE_L"]) == 0
    assert asked == [["BLEU", "CIDEr", "ROUGE_L"]]
    assert set(json.loads(capsys.readouterr().out)) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"}
    base += ["--metrics", "ROUGE_L"]
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a directory no file can be created in, even by root)")
    assert cli_main(base + ["--out", "/proc/chameleon-bench-metrics.json"]) == 2
    assert capsys.readouterr().err == "error: --out /proc/chameleon-bench-metrics.json: cannot be written (No such file or directory)\n"
    assert len(asked) == 1  # refused before scoring
    assert cli_main(base + ["--per-item", "/proc/chameleon-bench/items.jsonl"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"ROUGE_L": 1.0}  # the caption is its reference
    assert captured.err.startswith("error: --per-item /proc/chameleon-bench/items.jsonl: cannot be written (")
    assert "the metrics are printed above" in captured.err


def test_prompt_images_keep_transparency_for_the_models_preprocessing(tmp_path):
    """A caption image file is read in its own mode: preprocessing then blends transparency onto
    white, as Meta does (a plain convert("RGB") made transparent pixels black)."""
    import numpy as np

    from benchmarks.captioning.prompts import load_image
    from chameleon.vqgan import preprocess

    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (200, 10, 10, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    image = load_image(tmp_path / "half.png")
    white = Image.new("RGB", (64, 64), "white")
    white.paste(Image.fromarray(rgba, "RGBA"), mask=Image.fromarray(rgba[:, :, 3]))
    assert image.mode == "RGBA" and preprocess(image, 64).equal(preprocess(white, 64))
    with pytest.raises(InputError, match=r"half\.txt: not a readable image"):
        (tmp_path / "half.txt").write_text("no")
        load_image(tmp_path / "half.txt")


def test_prompts_showing_one_file_share_its_image(tmp_path):
    """Every captioning prompt is built before the model runs: a file shown by several prompts (a
    query here, a shot there) is decoded once and its image shared, not held once per prompt."""
    from benchmarks.runner.captioning import run_captioning
    from benchmarks.runner.suite import load_suite

    class Recorder:  # stands in for a model: only the requests it is given are looked at
        failures: dict = {}

        def generate_until(self, requests):
            self.requests = requests
            return ["a photo."] * len(requests)

    (tmp_path / "s.yaml").write_text("name: s\nbenchmarks:\n  - {name: c, benchmark: coco, shots: 2}\n")
    lm = Recorder()
    _, records = run_captioning(load_suite(str(tmp_path / "s.yaml")).benchmarks[0], lm, images_dir=None, limit=None, seed=1234)
    shown = [(image["file"], id(obj)) for rec, req in zip([r for r in records if not r["failed"]], lm.requests)
             for image, obj in zip(rec["images"], req.args[2]["visual"])]
    files = {f for f, _ in shown}
    assert len(shown) > len(files) and len(set(shown)) == len(files)  # files recur; one image object each


def test_references_without_words_refused_by_the_scorer():
    """Given directly (not from a file, whose loader refuses them), references that tokenize to
    nothing are named, not passed on to CIDEr, which fails on them with a bare ValueError."""
    with pytest.raises(InputError, match=r"references of 1 image\(s\) are empty once tokenized .* ids \[2\]"):
        score_captions({1: ["a cat on a mat"], 2: ["...", " - "]}, {1: "a cat", 2: "a dog"}, metrics=["CIDEr"])
