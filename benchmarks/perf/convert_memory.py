"""Memory and time of `chameleon-bench convert` at a realistic size, against the checkpoint's bytes.

Workload: a random bf16 Chameleon with the 7B's vocabulary (65,536) and fewer, narrower layers
(default dim 2048, 16 layers: ~1.1B parameters, ~2.2 GB), model_parallel_size 2 with q/k-norms
shared by all heads (so that one Meta file can hold it too), written in HF format, as one Meta file
and as two Meta shards. Each conversion runs as a child process of its own; its peak RSS is the
kernel's (wait4's ru_maxrss), which counts the pages of memory-mapped weight files it touched (clean
page cache, given back under pressure) as well as its own memory; peak anonymous memory (RssAnon,
sampled every 20 ms) is what it cannot give back. Ratios are to the weight files' bytes; the
baseline is a child that only imports the stack.

    .venv/bin/python benchmarks/perf/convert_memory.py [--dim 2048] [--layers 16] [--work DIR] [--from SRC ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from perf_args import check_built, json_path, positive_int  # beside this file

ROOT = Path(__file__).resolve().parents[2]
# (name, source, destination, convert flags)
CONVERSIONS = [
    ("hf -> meta, 2 shards", "hf", "out_meta2", ["--to", "meta"]),
    ("hf -> meta, 1 file", "hf", "out_meta1", ["--to", "meta", "--shards", "1"]),
    ("hf -> hf", "hf", "out_hfhf", ["--to", "hf"]),
    ("meta 1 file -> hf", "meta1", "out_hf1", ["--to", "hf"]),
    ("meta 2 shards -> hf", "meta2", "out_hf2", ["--to", "hf"]),
    ("meta 2 shards -> hf, --dtype fp16", "meta2", "out_fp16", ["--to", "hf", "--dtype", "fp16"]),
    ("meta 2 shards -> meta, 1 file", "meta2", "out_meta2to1", ["--to", "meta", "--shards", "1"]),
    ("meta 2 shards -> meta 2 shards", "meta2", "out_meta2to2", ["--to", "meta"]),
    ("meta 2 shards -> meta 2, --dtype fp16", "meta2", "out_meta2to2_fp16", ["--to", "meta", "--dtype", "fp16"]),
]


def shape(dim: int, layers: int) -> dict:
    """The ModelArgs values the flags set (the rest: the 7B's)."""
    return {"dim": dim, "n_layers": layers, "n_heads": dim // 128}


def build(work: Path, dim: int, layers: int) -> None:
    """The three source checkpoints, built in a child process (its memory is gone before measuring)."""
    code = f"""
import dataclasses, torch
from chameleon.config import preset
from chameleon.tiny import TINY_VQ, random_model
args = dataclasses.replace(preset("7B"), **{shape(dim, layers)!r}, model_parallel_size=2)
model = random_model(args, TINY_VQ, seed=0, text_vocab=8192)
with torch.no_grad():
    for name, p in model.transformer.named_parameters():
        if "_norm." in name and p.ndim == 2:  # q/k-norms: one for all heads, so that one Meta file holds them
            p.copy_(p[:1].expand_as(p))
model.transformer.to(torch.bfloat16)
model.tokenizer_file = {str(work / 'tokenizer.json')!r}
model.tokenizer.tokenizer.save(model.tokenizer_file)
model.save({str(work / 'hf')!r}, "hf")
model.save({str(work / 'meta1')!r}, "meta", shards=1)
model.save({str(work / 'meta2')!r}, "meta", shards=2)
print(sum(p.numel() for p in model.transformer.parameters()))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"building the checkpoints failed:\n{done.stderr[-3000:]}")
    (work / "params.txt").write_text(done.stdout.strip())


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".pth", ".ckpt"))


def measure(cmd: list[str]) -> dict:
    """Run `cmd`; its wall time, peak RSS (exact) and peak anonymous RSS (sampled)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    stop = threading.Event()

    def sample():
        nonlocal peak_anon
        while not stop.is_set():
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024, "peak_anon": peak_anon}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=positive_int, default=2048, help="model width (heads of 128; a multiple of 256)")
    parser.add_argument("--layers", type=positive_int, default=16, help="decoder layers")
    parser.add_argument("--work", default=None, help="directory for the checkpoints, kept and reused by later runs of "
                        "the same --dim/--layers (default: a temporary one, removed)")
    parser.add_argument("--from", dest="sources", nargs="+", choices=sorted({src for _, src, _, _ in CONVERSIONS}), default=None,
                        help="only the conversions from these sources (default: all)")
    parser.add_argument("--json", type=json_path, default=None, help="also write the report here")
    opts = parser.parse_args()
    if opts.dim % 256:  # heads of 128, split evenly over the 2 model-parallel shards
        parser.error(f"argument --dim: expected a multiple of 256 (heads of 128, 2 shards), got {opts.dim}")
    work = Path(opts.work or tempfile.mkdtemp(prefix="convert_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "params.txt").is_file():
            build(work, opts.dim, opts.layers)
        else:  # refused, not rebuilt: the build there took minutes, and may be wanted as it is
            for src in dict.fromkeys(src for _, src, _, _ in CONVERSIONS):
                check_built(parser, "--work", work / src, shape(opts.dim, opts.layers))
        base = measure([sys.executable, "-c", "import benchmarks.cli, chameleon.chameleon, chameleon.commands"])
        report = {"dim": opts.dim, "layers": opts.layers, "parameters": int((work / "params.txt").read_text()),
                  "baseline_rss_gb": round(base["peak_rss"] / 1e9, 2), "rows": []}
        print(f"baseline (imports): peak RSS {report['baseline_rss_gb']} GB", file=sys.stderr)
        for name, src, dst, flags in CONVERSIONS:
            if opts.sources and src not in opts.sources:
                continue
            shutil.rmtree(work / dst, ignore_errors=True)
            size = weight_bytes(work / src)
            m = measure([sys.executable, "-m", "benchmarks.cli", "convert", str(work / src), str(work / dst), *flags])
            row = {"conversion": name, "weights_gb": round(size / 1e9, 2), "seconds": round(m["seconds"], 1),
                   "peak_rss_gb": round(m["peak_rss"] / 1e9, 2), "peak_rss_ratio": round(m["peak_rss"] / size, 2),
                   "above_baseline_ratio": round((m["peak_rss"] - base["peak_rss"]) / size, 2),
                   "peak_anon_ratio": round((m["peak_anon"] - base["peak_anon"]) / size, 2)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / dst, ignore_errors=True)
        if opts.json:
            opts.json.write_text(json.dumps(report, indent=2))
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
