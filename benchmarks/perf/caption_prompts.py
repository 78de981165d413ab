"""Captioning before the model: memory and time of building, reading and hashing the prompts.

Workload: a 2-shot captioning benchmark over N photo files, copies of the shipped COCO photos under
distinct names (each a file of its own to read and hash, as in a real split), run by
`chameleon-bench run` with the `responses` backend, which answers nothing: what is measured is the
runner's own work before and after the model (references, prompts, reading and hashing every image,
scoring), not a model's. Run at two sizes, so that the growth per photo shows what the run holds per
photo; the comparison is a decoded photo's size, what holding every image decoded until the model
ran would cost (the runner did that before prompts showed `FileImage`s).

    .venv/bin/python benchmarks/perf/caption_prompts.py [--photos 200,800] [--nproc 1]

`--nproc 2` runs each size under torchrun with two processes (each reads and hashes a share).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from perf_args import json_path, positive_int, positive_ints  # beside this file

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "benchmarks/data/images/coco"


def workload(where: Path, n: int) -> tuple[Path, Path]:
    """N photo files and a suite scoring them 2-shot; returns (suite, images dir)."""
    images = where / "images"
    images.mkdir(parents=True, exist_ok=True)
    sources = sorted(PHOTOS.glob("*.jpg"))
    refs = []
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        if not (images / name).exists():
            shutil.copyfile(sources[i % len(sources)], images / name)
        refs.append({"image": f"val2014/{name}", "caption": [f"A photo numbered {i}.", "A picture of something."]})
    (where / "refs.json").write_text(json.dumps(refs))
    suite = where / f"suite{n}.yaml"
    suite.write_text(f"name: caption_prompts\nbenchmarks:\n  - {{name: coco, benchmark: coco, shots: 2, "
                     f"references: {where / 'refs.json'}, metrics: [bleu]}}\n")
    return suite, images


def run(where: Path, n: int, nproc: int) -> dict:
    suite, images = workload(where, n)
    responses = where / "responses.jsonl"
    responses.write_text('{"item_id": "none", "output": ""}\n')
    out = where / f"run{n}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["run", str(suite), "--backend", "responses", "--model", str(responses), "--out", str(out),
            "--images-dir", f"coco={images}"]
    if nproc > 1:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(nproc), "-m", "benchmarks.cli", *args]
    else:
        cmd = [sys.executable, "-m", "benchmarks.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # A child per size, so that each size's peak is its own (RUSAGE_CHILDREN keeps the largest child's)
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(done.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.stderr.write(done.stderr[-3000:] if done.returncode else '')")
    done = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    rc, seconds, peak_kib = done.stdout.split()
    if rc != "0":
        raise SystemExit(f"run of {n} photos failed:\n{done.stderr}")
    return {"photos": n, "seconds": round(float(seconds), 2), "peak_rss_mib": round(int(peak_kib) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=positive_ints, default="200,800", help="two comma-separated sizes (default 200,800)")
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes (torchrun) per run (default 1)")
    parser.add_argument("--json", type=json_path, help="also write the report here")
    args = parser.parse_args()
    if len(args.photos) != 2 or args.photos[0] == args.photos[1]:  # the growth per photo is the slope between them
        parser.error(f"argument --photos: expected two different sizes, got {','.join(map(str, args.photos))}")
    small, large = sorted(args.photos)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(Path(tmp), n, args.nproc) for n in (small, large)]
    decoded = [Image.open(p) for p in sorted(PHOTOS.glob("*.jpg"))]
    decoded_mib = sum(im.width * im.height * len(im.getbands()) for im in decoded) / len(decoded) / 2**20
    growth = (rows[1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]) / (large - small)
    report = {
        "workload": "2-shot captioning, responses backend (no model), photos = copies of the shipped COCO photos",
        "nproc": args.nproc, "rows": rows,
        "rss_growth_mib_per_photo": round(growth, 4),
        "decoded_photo_mib": round(decoded_mib, 3),  # what holding each photo decoded would add
        "growth_ratio_vs_holding_decoded": round(growth / decoded_mib, 4),
        "seconds_per_photo": round((rows[1]["seconds"] - rows[0]["seconds"]) / (large - small), 4),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
