"""MMLU 5-shot loglikelihood throughput: our Chameleon backend vs lm-eval's own HF backend.

Model: a ~100M-parameter Chameleon-shaped decoder (65,536-token vocabulary, QK-norm, random
weights) written once in HF format; both sides load the same files. Workload: the first
`--per-subject` test items of each of `--subjects` MMLU subjects shipped in benchmarks/data,
5-shot, as lm-eval's `chameleon_mmlu_*` tasks build them (4 loglikelihood requests per item).

Competitor: lm-eval's `hf` model type (HFLM). Its AutoModelForCausalLM cannot load Chameleon,
so HFLM is given transformers' ChameleonForConditionalGeneration loaded from the same directory
(HFLM accepts a model instance) and scores exactly as it does for any causal LM: one full
(context + continuation) sequence per request, batched, logits at every position. BOS is
prepended on both sides (Chameleon is trained with it). Ours: requests grouped by context, each
5-shot context run once, left-padded batches, vocabulary logits at the last position only.

Asserts equal scores (every loglikelihood within 1e-3, identical accuracy) and speedup >= 2x.

    .venv/bin/python benchmarks/perf/mmlu_loglikelihood.py [--subjects 10] [--per-subject 5] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from perf_args import check_built, json_path, positive_int  # noqa: E402  (beside this file)

TARGET_SPEEDUP = 2.0
CONFIG = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=65536, multiple_of=256, max_seq_len=4096)


def build_model(out: Path) -> Path:
    from chameleon.config import ModelArgs
    from chameleon.tiny import build_tiny_model

    if not (out / "config.json").is_file():
        build_tiny_model(out, "hf", seed=0, args=ModelArgs(**CONFIG))
    return out


def mmlu_requests(subjects: int, per_subject: int):
    from lm_eval.tasks import get_task_dict

    from benchmarks.text.data import SHIPPED_DATA_DIR
    from benchmarks.text.run import text_task_manager

    names = sorted(p.name.removesuffix("_test.csv") for p in (SHIPPED_DATA_DIR / "mmlu" / "test").glob("*_test.csv"))
    step = max(1, len(names) // subjects)
    chosen = names[::step][:subjects]  # spread over the alphabet (and the four categories)
    tasks = get_task_dict([f"chameleon_mmlu_{s}" for s in chosen], text_task_manager())
    requests = []
    for task in tasks.values():
        task.build_all_requests(limit=per_subject, rank=0, world_size=1)
        requests += task.instances
    return chosen, requests


def accuracy(requests, scores) -> float:
    by_doc: dict[tuple, list] = {}
    for req, (lp, _) in zip(requests, scores):
        by_doc.setdefault((req.task_name, req.doc_id), []).append((req.idx, lp, req.doc["answer"]))
    hits = [max(rows, key=lambda r: r[1])[0] == rows[0][2] for rows in by_doc.values()]
    return sum(hits) / len(hits)


def timed(fn, requests):
    start = time.perf_counter()
    out = fn(requests)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=positive_int, default=10)
    ap.add_argument("--per-subject", type=positive_int, default=5)
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--model-dir", type=Path, help="where to build/reuse the ~100M model (default: a temp dir); "
                    "a model of another shape there is refused")
    ap.add_argument("--json", type=json_path, help="also write the figures here")
    args = ap.parse_args()
    if args.model_dir and (args.model_dir / "config.json").is_file():  # refused, not rebuilt: it may be the user's
        check_built(ap, "--model-dir", args.model_dir, CONFIG)

    import transformers
    from lm_eval.models.huggingface import HFLM

    from benchmarks.backends import load_backend

    model_dir = build_model(args.model_dir or Path(tempfile.mkdtemp()) / "chameleon-100m")
    subjects, requests = mmlu_requests(args.subjects, args.per_subject)
    n_items = len({(r.task_name, r.doc_id) for r in requests})

    ours = load_backend("chameleon", str(model_dir), batch_size=args.batch_size)
    n_params = sum(p.numel() for p in ours.model.transformer.parameters())
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # The exported tokenizer names no special tokens (the config has their ids) and adds no BOS;
    # give it what Meta's released tokenizer does, so lm-eval's add_bos_token prepends <s>.
    from tokenizers.processors import TemplateProcessing

    cfg = hf_model.config
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = tokenizer.convert_ids_to_tokens(
        [cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, cfg.bos_token_id)])
    theirs = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=args.batch_size, add_bos_token=True,
                  max_length=CONFIG["max_seq_len"], device="cpu")
    lengths = [len(ours.encode_pair([r.args[0]], r.args[1])[0]) for r in requests]

    warm = requests[:4]
    ours.loglikelihood(warm), theirs.loglikelihood(warm)
    their_scores, their_s = timed(theirs.loglikelihood, requests)
    our_scores, our_s = timed(ours.loglikelihood, requests)

    worst = max(abs(a[0] - b[0]) for a, b in zip(our_scores, their_scores))
    acc_ours, acc_theirs = accuracy(requests, our_scores), accuracy(requests, their_scores)
    speedup = their_s / our_s
    figures = {
        "machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op",
        "model_params": n_params, "config": CONFIG, "subjects": subjects, "items": n_items,
        "requests": len(requests), "context_tokens_mean": sum(lengths) / len(lengths), "batch_size": args.batch_size,
        "lm_eval_hf_s": round(their_s, 2), "ours_s": round(our_s, 2),
        "lm_eval_hf_requests_per_s": round(len(requests) / their_s, 2),
        "ours_requests_per_s": round(len(requests) / our_s, 2),
        "speedup": round(speedup, 2), "max_abs_loglikelihood_diff": worst,
        "accuracy_ours": acc_ours, "accuracy_lm_eval_hf": acc_theirs,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    assert worst < 1e-3 and acc_ours == acc_theirs, "scores differ"
    assert speedup >= TARGET_SPEEDUP, f"speedup {speedup:.2f}x < {TARGET_SPEEDUP}x"
    print(f"OK: {speedup:.2f}x lm-eval's HF backend ({len(requests) / our_s:.1f} vs {len(requests) / their_s:.1f} requests/s), equal scores")


if __name__ == "__main__":
    main()
