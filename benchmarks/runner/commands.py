"""`chameleon-bench run SUITE --model MODEL --out RUN_DIR`: a suite on one backend, resumable."""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

from chameleon.commands import DTYPE_HELP, announced, check_device, names_file_in, parse_dtype
from chameleon.errors import InputError, refuse_empty_paths


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a benchmark suite (resumable; shards under torchrun)",
        description="Run a suite (a shipped name: paper, smoke; or a YAML path) on one model. Rerun the same "
                    "command after an interruption to finish it; under `torchrun --nproc-per-node N` items are "
                    "sharded across processes.",
        epilog="Backend responses reads JSONL, one object per line: \"output\" (generated text) or "
               "\"loglikelihood\" (+ \"is_greedy\"), keyed by \"request_hash\" or \"item_id\" as the samples "
               "files record them (\"<task>/<doc_id>\" for text, the image id for captioning); \"sample\": the "
               "k-th sample of maj@k (from 0). Loglikelihoods by request_hash only. Lines no request used are "
               "reported at the end.")
    p.add_argument("suite", help="shipped suite name (paper, smoke) or a suite YAML file")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub repo id ORG/NAME[@REVISION] "
                                                  "(chameleon, hf; a repo id is fetched into the hub cache, or with "
                                                  "HF_HUB_OFFLINE=1 read from it alone), or responses JSONL (responses)")
    p.add_argument("--out", required=True, help="run directory (results.json, samples/, cache/)")
    p.add_argument("--backend", choices=["chameleon", "hf", "responses"], help="default: the suite's backend")
    p.add_argument("--batch-size", type=int, help="default: the suite's batch_size")
    p.add_argument("--limit", type=int, help="the first N items of each benchmark (smaller of this and the suite's "
                                            "limit), as lm-eval counts them: per task, so MMLU gets N per subject "
                                            "(57 N items) and math (the full MATH) N per subject (7 N)")
    p.add_argument("--images-dir", action="append", default=[], metavar="DATASET=DIR",
                   help="images of a captioning dataset, e.g. coco=/data/coco/val2014 (repeatable); "
                        "default: the shipped photos, COCO only (flickr30k needs one)")
    p.add_argument("--data-dir", help="directory with full text benchmark files (layout of benchmarks/data)")
    p.add_argument("--chunk-size", type=int, help="requests per saved chunk (resume granularity); default 4 x batch size (responses: 32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (under torchrun, cuda is "
                                                  "each process's own GPU); default: cpu")
    p.add_argument("--dtype", default="float32", help=f"{DTYPE_HELP}; default: float32")
    p.add_argument("--verbose", action="store_true",
                   help="lm-eval's own logging and progress bars, datasets' and transformers' messages "
                        "(default: one progress bar and one summary line per benchmark, library errors only)")
    p.set_defaults(func=run_command)


def parse_images_dirs(values: list[str]) -> dict[str, Path]:
    from benchmarks.runner.suite import CAPTIONING

    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or name not in CAPTIONING or not path:
            raise InputError(f"--images-dir {v!r}: expected DATASET=DIR with DATASET one of {', '.join(CAPTIONING)} "
                             "and DIR a directory")
        if name in out:
            raise InputError(f"--images-dir {v!r}: {name} is given twice")
        if not Path(path).is_dir():
            raise InputError(f"--images-dir {v!r}: {path} is not a directory")
        out[name] = Path(path)
    return out


def run_command(args) -> int:
    from benchmarks.backends import image_input_problem, load_backend
    from benchmarks.runner.dist import PeerFailed, init_dist
    from benchmarks.runner.progress import configure_console
    from benchmarks.runner.results import format_results_table
    from benchmarks.runner.run import check_generation_room, check_image_input, check_inputs, check_out_dir, run_suite
    from benchmarks.runner.suite import load_suite
    from chameleon.checkpoint import resolve_checkpoint_path

    refuse_empty_paths(("--model", args.model), ("--out", args.out))  # (Path("") is the current directory)
    args.out = Path(args.out)
    suite = load_suite(args.suite)
    if args.data_dir is not None and not str(args.data_dir).strip():
        raise InputError("--data-dir: empty path; give the directory with the full benchmark files, or leave the flag out")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    dtype = str(parse_dtype(args.dtype)).removeprefix("torch.")  # the backends take torch's name
    images_dirs = parse_images_dirs(args.images_dir)
    check_out_dir(args.out)
    verbose = args.verbose
    configure_console(verbose)
    try:
        check_inputs(suite, args.data_dir, images_dirs)  # before the model loads
    except InputError as err:  # the data reader names its argument: name the flag the user typed
        raise InputError(re.sub(r"\bdata_dir (?=')", "--data-dir ", str(err))) from None
    dist = init_dist()
    kind = args.backend or suite.backend
    if kind == "responses":  # (no model runs: nothing reads them)
        ignored = [flag for flag, value, default in (("--device", args.device, "cpu"), ("--dtype", dtype, "float32"),
                                                     ("--batch-size", args.batch_size, None)) if value != default]
        if ignored and dist.is_main:
            print(f"warning: {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with backend responses",
                  file=sys.stderr)
    kwargs = {} if kind == "responses" else {"batch_size": args.batch_size or suite.batch_size,
                                             "device": dist.device(args.device), "dtype": dtype}
    if kind != "responses":  # before the model loads, for every backend
        check_device(kwargs["device"])
    path = Path(args.model) if kind == "responses" else resolve_checkpoint_path(args.model)  # a hub repo id: its snapshot
    if kind != "responses" and not path.is_dir():
        raise InputError(f"--model {args.model}: expected a checkpoint directory or hub repo id for backend {kind}")
    check_image_input(suite, kind, args.model, image_input_problem(kind, str(path)))  # before the model loads
    # The backend is given the name as typed, which it records (with a hub snapshot's commit); it
    # resolves to the same snapshot (resolve_checkpoint_path resolves a repo once per process).
    with announced("loading", path, enabled=kind != "responses" and dist.is_main):
        backend = load_backend(kind, args.model, **kwargs)
    check_generation_room(suite, backend)
    try:
        results = run_suite(suite, backend, args.out, limit=args.limit, images_dirs=images_dirs,
                            data_dir=args.data_dir, dist=dist, chunk_size=args.chunk_size, command=sys.argv,
                            verbose=verbose, inputs_checked=True)
    except PeerFailed as err:  # another torchrun process failed first and printed why; torchrun stops the rest
        raise InputError(f"--out {args.out}: another process of this torchrun job stopped ({err}; its own error, "
                         "if any, is above); this one stops too. Requests finished so far stay in its cache/: "
                         "rerun the command to resume") from None
    except OSError as err:  # a damaged run directory (cache/ a file, ...) or a full disk: name it, no traceback
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)  # a write to an open file names none
        if not (names_file_in(err, args.out) or full):
            raise
        reason = "a file where a directory belongs" if isinstance(err, FileExistsError) else err.strerror or err
        path = err.filename2 or err.filename or "its files"  # a rename names its target second
        raise InputError(f"--out {args.out}: cannot read or write {path} ({reason}); "
                         "requests finished so far stay in its cache/: fix this and rerun the command to resume") from None
    if dist.is_main:
        print(format_results_table(results))
        print(f"results: {args.out / 'results.json'}")
    return 0
