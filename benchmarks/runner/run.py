"""`run_suite`: every benchmark of a suite on one backend, into a run directory.

RUN_DIR/
  run.json              the model (fingerprint) and run identity (suite, settings) this directory
                        belongs to, and the resolved suite; another model, suite or setting ->
                        InputError (for another suite, naming what differs)
  cache/rank*.jsonl     every finished request, appended and fsynced (resume after any kill)
  samples/<name>.jsonl  per-sample records of each benchmark
  results.json          versioned results (SCHEMA.md), rewritten after each benchmark; a rerun keeps
                        the entries it holds until it replaces them (an interrupted one loses none)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.backends.base import MixedModalLM, parse_gen_kwargs
from benchmarks.runner.captioning import run_captioning
from benchmarks.runner.dist import Dist, as_single_process
from benchmarks.runner.progress import BenchmarkProgress, summary_line
from benchmarks.runner.resumable import ResumableLM
from benchmarks.runner.results import (
    SCHEMA_VERSION, display_path, metric_entry, package_versions, sha256_file, write_json_atomic, write_jsonl_atomic,
)
from benchmarks.runner.store import RecordStore
from benchmarks.runner.suite import BenchmarkSpec, Suite
from chameleon.errors import InputError


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_inputs(suite: Suite, data_dir: str | Path | None = None, images_dirs: dict[str, Path] | None = None) -> None:
    """Read every data file the suite will, and look for each captioning benchmark's images and
    few-shot pool, so bad inputs fail before the model loads and --out is claimed, not hours into a
    suite (the benchmarks read their inputs again)."""
    from benchmarks.runner.captioning import DEFAULT_IMAGES, DEFAULT_REFERENCES, exemplar_pool, find_images
    from benchmarks.captioning.references import load_references
    from benchmarks.text.data import check_task_data
    from benchmarks.text.run import BENCHMARKS
    from chameleon.vqgan import open_image

    text = [s for s in suite.benchmarks if s.kind == "text"]
    if text:
        tasks: dict[str, int] = {}  # task -> the most shots a benchmark of the suite asks of it
        for s in text:
            task = BENCHMARKS[s.benchmark].greedy if s.k == 1 else BENCHMARKS[s.benchmark].sampled
            tasks[task] = max(tasks.get(task, 0), s.shots)
        check_task_data(tasks, data_dir)
    for spec in (s for s in suite.benchmarks if s.kind == "captioning"):
        try:
            references = load_references(spec.references or DEFAULT_REFERENCES[spec.benchmark])
            image_dir = Path((images_dirs or {}).get(spec.benchmark) or DEFAULT_IMAGES[spec.benchmark])
            found, _ = find_images(spec, references, image_dir)
            for path in found.values():  # headers only: an unusable image is named now, not hours in
                open_image(path, decode=False)
            exemplar_pool(spec, references=references, found=found, image_dir=image_dir)
        except InputError as err:
            raise InputError(f"{suite.path}: {err}" if str(err).startswith("benchmark '") else
                             f"{suite.path}: benchmark '{spec.name}': {err}") from None


def check_image_input(suite: Suite, backend: str, model, problem: str | None) -> None:
    """Refuse a suite with captioning on a backend that cannot take images from this model (`problem`
    says why), before any benchmark runs: otherwise it fails only after all the text benchmarks."""
    captioning = [s.name for s in suite.benchmarks if s.kind == "captioning"]
    if captioning and problem:
        raise InputError(f"{suite.path}: benchmark(s) {', '.join(captioning)} need image input, which backend "
                         f"{backend} cannot give --model {model}: {problem}. Nothing was run")


def check_generation_room(suite: Suite, backend) -> None:
    """Refuse a suite's max_gen_toks that leaves the model no room for a prompt, before any
    benchmark runs (the backend would refuse it only when that benchmark's turn came)."""
    room = getattr(backend, "max_length", None)
    for spec in suite.benchmarks:
        wanted = spec.generation.get("max_gen_toks")
        if room is not None and wanted is not None and wanted >= room:
            raise InputError(f"{suite.path}: benchmark '{spec.name}': generation max_gen_toks {wanted} leaves no room "
                             f"for a prompt in the model's context of {room} tokens; expected fewer. Nothing was run")


def _where(path, shipped=None) -> str | None:
    """A path as run identities record it: absolute, or None where not given or the shipped one."""
    if not path:
        return None
    resolved = Path(path).expanduser().resolve()
    return None if shipped is not None and resolved == Path(shipped).resolve() else str(resolved)


def run_identity(suite: Suite, model: dict, *, limit=None, images_dirs=None, data_dir=None) -> dict:
    """What a run's results depend on besides the weights: a rerun into the same --out must match it.
    Inputs as they take effect: the shipped data and images (given or by default) are null, so the
    record survives a move of the repository; other paths are absolute (a relative path in the
    suite is read from the working directory). Batch size, chunk size and process count are left
    out (they do not change results)."""
    from benchmarks.captioning.references import SHIPPED
    from benchmarks.runner.captioning import DEFAULT_IMAGES
    from benchmarks.text.data import SHIPPED_DATA_DIR

    def references(source):  # a shipped set by name, or a file
        return None if source is None or str(source) in SHIPPED else _where(source)

    captioning = [s for s in suite.benchmarks if s.kind == "captioning"]
    return {"suite_sha256": suite.sha256, "limit": limit, "dtype": model.get("dtype"),
            "data_dir": _where(data_dir, SHIPPED_DATA_DIR) if any(s.kind == "text" for s in suite.benchmarks) else None,
            "images_dirs": {b: _where((images_dirs or {}).get(b), DEFAULT_IMAGES[b]) for b in sorted({s.benchmark for s in captioning})},
            "caption_files": {s.name: [references(s.references), references(s.exemplars), _where(s.exemplar_images)] for s in captioning}}


def _recorded_identity(out: Path, manifest: dict, identity: dict) -> dict:
    if "identity" in manifest:
        return manifest["identity"]
    # run.json of an earlier version, without "identity", or deleted: the identity its results.json
    # records, else what that shows, else nothing (an interrupted run is resumed) and this command's
    # identity is recorded from now on. From a results.json of an earlier version, without
    # "identity": the data and images as `identity` (this command's) records them: for the same suite
    # (compared too), the benchmarks that read them are the same (a relative path is read from the
    # working directory: where it was given is not recorded), and the caption files not at all.
    from benchmarks.runner.captioning import DEFAULT_IMAGES
    from benchmarks.text.data import SHIPPED_DATA_DIR

    try:
        res = json.loads((out / "results.json").read_text())
        if isinstance(res.get("identity"), dict):
            return res["identity"]
        given = res["overrides"]
        recorded = {"suite_sha256": res["suite"]["sha256"], "limit": given["limit"], "dtype": res["model"].get("dtype")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    try:  # (a results.json of an earlier version may lack them)
        if any(b.get("benchmark") not in DEFAULT_IMAGES for b in res["suite"]["benchmarks"]):  # text: see run_identity
            recorded["data_dir"] = _where(given["data_dir"], SHIPPED_DATA_DIR)
        recorded["images_dirs"] = {b: _where(given["images_dirs"].get(b), DEFAULT_IMAGES[b]) for b in identity.get("images_dirs", {})}
    except (KeyError, TypeError, AttributeError):
        pass
    return recorded


def _recorded_suite(out: Path, manifest: dict) -> dict | None:
    """The resolved suite the directory's run was started with: run.json's, or for a run.json of an
    earlier version (none there) its results.json's, if any."""
    if isinstance(manifest.get("suite"), dict):
        return manifest["suite"]
    try:
        suite = json.loads((out / "results.json").read_text())["suite"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return suite if isinstance(suite, dict) else None


def _shown(value) -> str:
    """A setting in a refusal: "unset" rather than Python's None (an absent key, or a flag not given)."""
    return "unset" if value is None else repr(value)


def _suite_changes(old: dict, new: dict) -> list[str]:
    """What differs between two resolved suites (Suite.to_dict), "X there, Y now" where short: a
    refusal showing only two file hashes would leave the user to find the edit."""
    new = json.loads(json.dumps(new))  # as run.json holds it (lists, not tuples)

    def fields(prefix: str, a: dict, b: dict) -> list[str]:
        out = []
        for key in dict.fromkeys([*a, *b]):
            x, y = a.get(key), b.get(key)
            if x == y:
                continue
            if isinstance(x, dict) and isinstance(y, dict):  # generation: name the setting
                out += fields(f"{prefix}{key}.", x, y)
            elif max(len(repr(x)), len(repr(y))) <= 100:  # paths fit; a long description does not
                out.append(f"{prefix}{key} {_shown(x)} there, {_shown(y)} now")
            else:
                out.append(f"{prefix}{key} differs")
        return out

    changes = fields("suite ", {k: v for k, v in old.items() if k not in ("benchmarks", "sha256")},
                     {k: v for k, v in new.items() if k not in ("benchmarks", "sha256")})
    olds = {b["name"]: b for b in old.get("benchmarks") or [] if isinstance(b, dict) and isinstance(b.get("name"), str)}
    news = {b["name"]: b for b in new["benchmarks"]}
    changes += [f"benchmark {n!r} there, not now" for n in olds if n not in news]
    changes += [f"benchmark {n!r} now, not there" for n in news if n not in olds]
    for name in (n for n in news if n in olds):
        changes += fields(f"benchmark {name!r} ", olds[name], news[name])
    if [n for n in olds if n in news] != [n for n in news if n in olds]:
        changes.append("benchmarks in another order")
    return changes or [f"suite file text (sha256 {str(old.get('sha256'))[:16]} there, {new['sha256'][:16]} now; "
                       "the same settings: comments or layout only)"]


def _lost_manifest(out: Path) -> dict | None:
    """For a run directory whose run.json is gone (deleted by hand), what stands in for it: a
    manifest of the model its results.json names, without identity (_recorded_identity then compares
    results.json's suite and settings, as for an old run.json), or {} where only cache/ is left (its
    keys hash the model's fingerprint: it answers no other model). None: `out` is no such directory."""
    if not (out / "cache").is_dir():
        return None
    names = {p.name for p in out.iterdir()} - {"run.json.tmp", "results.json.tmp"}
    if names <= {"cache"}:
        return {}
    if not names <= {"cache", "samples", "results.json"}:
        return None
    try:
        results = json.loads((out / "results.json").read_text())
        model, started = results["model"], results["run"]["started_at"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        return None
    return {"schema_version": SCHEMA_VERSION, "model": model, "created_at": started}


def _out_problem(out: Path) -> str | None:
    """Why `out` can be neither a new run directory nor an earlier run, as far as is known without
    the model (None: it may be)."""
    if (out / "run.json").is_file() or (out.is_dir() and _lost_manifest(out) is not None):
        return None
    # (run.json.tmp alone: a fresh run killed while writing its manifest, before anything was computed)
    if out.is_dir() and (out / "cache").is_dir():
        return (f"--out {out}: holds a run's cache/ but no run.json, nor a results.json naming the run's model; "
                "leave only cache/ there (move the rest away) to resume from it, or use another --out. "
                "Nothing was written")
    if out.exists() and (not out.is_dir() or any(p.name != "run.json.tmp" for p in out.iterdir())):
        return f"--out {out}: exists and is not an empty directory or a chameleon-bench run; nothing was written"
    above = next(p for p in out.absolute().parents if p.exists())
    if not above.is_dir():
        return f"--out {out}: {above} is a file, not a directory; nothing was written"
    return None


def check_out_dir(out: Path) -> None:
    """`_out_problem` as an InputError, and another run writing to `out` now: the command's check of
    --out before it loads the model."""
    problem = _out_problem(Path(out))
    # the main process only (this runs before torchrun's group forms): the processes of one job
    # start together, and two probing at once would each see the other's lock
    if not problem and Path(out).is_dir() and os.environ.get("RANK", "0") == "0":
        lock, problem = _lock(Path(out))
        if lock is not None:
            os.close(lock)
    if problem:
        raise InputError(problem)


def _lock(out: Path) -> tuple[int | None, str | None]:
    """(an exclusive lock on the directory `out`, or why there is none). Two runs writing one
    directory at once would each compute every request, append them to one cache file twice and
    race on results.json. flock on the directory itself adds no file to it, and the system
    releases it however the process ends (a killed run leaves no stale lock)."""
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:
        return None, None  # the claim names the problem
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, (f"--out {out}: another chameleon-bench run is writing to it now; wait for it to end (then "
                      "rerun this command to resume or check it), or use another --out. Nothing was written")
    except OSError:  # a file system without locks: run unlocked, as before
        pass
    return fd, None


@contextmanager
def locked_run_dir(out: Path, dist: Dist):
    """Hold `out` (created if new and allowed) against other runs while this one writes it; the
    main process locks, every process is refused alike."""
    fd, error = None, None
    if dist.is_main:
        error = _create(out) if not out.is_dir() else None
        if not error:
            fd, error = _lock(out)
    try:
        error = dist.broadcast(error)
        if error:
            raise InputError(error)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _create(out: Path) -> str | None:
    """Why `out` cannot be a new run directory, or None once it exists (empty, or an earlier run)."""
    problem = _out_problem(out)
    if problem:
        return problem
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--out {out}: cannot create the directory ({err.strerror}); nothing was written"
    return None


def _claim(out: Path, model: dict, identity: dict, suite: dict | None = None) -> str | None:
    """The reason `out` cannot be this run's directory, or None once it is."""
    manifest = out / "run.json"
    lost = None if manifest.is_file() or not out.is_dir() else _lost_manifest(out)
    if manifest.is_file() or lost:
        try:
            data = lost or json.loads(manifest.read_text())
            owner = data["model"]
        except (OSError, ValueError, KeyError, TypeError):
            owner = None
        if not isinstance(owner, dict) or not isinstance(data.get("identity", {}), dict):
            return (f"--out {out}: {manifest} is not a chameleon-bench run manifest: expected the JSON object with "
                    "the run's 'model' written when it began; restore it, or use another --out. Nothing was written")
        if owner.get("fingerprint") != model["fingerprint"]:
            # weights are fingerprinted as loaded: the same checkpoint in another dtype differs too
            was, now = (str(m.get("dtype")).removeprefix("torch.") for m in (owner, model))
            todo = "use another --out"
            if owner.get("dtype") and was != now:
                todo = (f"that run loaded its weights as {was}, this one as {now}: if the checkpoint is the same, "
                        f"rerun with --dtype {was} to resume it, or {todo}")
            return (f"--out {out} holds a run of another model ({owner.get('backend')} {owner.get('path')}, "
                    f"fingerprint {str(owner.get('fingerprint'))[:16]}), not of this one (fingerprint "
                    f"{model['fingerprint'][:16]}); {todo}. Nothing was overwritten")
        recorded, diff = _recorded_identity(out, data, identity), []
        for k, v in recorded.items():
            if v == identity.get(k):
                continue
            old_suite = _recorded_suite(out, data) if k == "suite_sha256" and suite else None
            diff += _suite_changes(old_suite, suite) if old_suite else [f"{k} {_shown(v)} there, {_shown(identity.get(k))} now"]
        if diff:
            return (f"--out {out} holds a run of another suite or settings ({'; '.join(diff)}); rerun its own "
                    f"command to finish it, or use another --out. Nothing was overwritten")
        if "identity" not in data:
            write_json_atomic(manifest, {**data, "identity": identity, **({"suite": suite} if suite else {})})
        return None
    problem = _create(out)
    if problem:
        return problem
    write_json_atomic(manifest, {"schema_version": SCHEMA_VERSION, "model": model, "identity": identity,
                                 **({"suite": suite} if suite else {}), "created_at": _now()})
    return None


def check_same_model(model: dict, dist: Dist) -> None:
    """Every process of a torchrun job loaded the same model (only the main process's is recorded): a
    hub branch that moved while they started, or a checkpoint rewritten under them, would otherwise
    mix two models' outputs in one run."""
    fingerprints = dist.all_gather(model["fingerprint"])
    if len(set(fingerprints)) > 1:
        shown = ", ".join(f"rank {rank}: {fp[:16]}" for rank, fp in enumerate(fingerprints))
        raise InputError(f"--model: the processes of this job loaded different models (fingerprints {shown}); pin the "
                         "checkpoint (a local directory, or ORG/NAME@COMMIT) and rerun. Nothing was written")


def claim_run_dir(out: Path, model: dict, dist: Dist, identity: dict, suite: dict | None = None) -> None:
    """Make `out` the directory of this model's run `identity` (run_identity), or refuse (InputError)
    without touching it; a directory of the same model and identity is resumed. `suite`
    (Suite.to_dict) is recorded with it, so that a refusal for another suite can say what differs."""
    error = _claim(out, model, identity, suite) if dist.is_main else None
    error = dist.broadcast(error)
    if error:
        raise InputError(error)


def _earlier_results(out: Path, model: dict, identity: dict, suite: Suite) -> tuple[dict, dict]:
    """(benchmark entries, data_files) of the directory's results.json that a rerun shows until it has
    run those benchmarks again, so that one interrupted before then leaves no less than there was.
    Read before the claim: only from a run.json of this same identity (one of an earlier version,
    without it, is adopted by the claim unchecked for data and images), and only entries whose
    samples file is still the one they name (a rerun killed between writing a benchmark's samples
    and results.json leaves the old entry describing another file)."""
    try:
        if json.loads((out / "run.json").read_text()).get("identity") != identity:
            return {}, {}
        old = json.loads((out / "results.json").read_text())
        if old["model"]["fingerprint"] != model["fingerprint"]:
            return {}, {}
        entries, data_files = dict(old["benchmarks"]), dict(old["data_files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, {}

    def matches(entry) -> bool:
        try:
            return sha256_file(out / entry["samples_file"]) == entry["samples_sha256"]
        except (OSError, KeyError, TypeError):
            return False

    kept = {s.name: entries[s.name] for s in suite.benchmarks if s.name in entries and matches(entries[s.name])}
    return kept, data_files if kept else {}


def run_suite(suite: Suite, backend: MixedModalLM, out: str | Path, *, limit: int | None = None,
              images_dirs: dict[str, Path] | None = None, data_dir: str | Path | None = None,
              dist: Dist = Dist(), chunk_size: int | None = None, command: list[str] | None = None,
              progress: bool = True, verbose: bool = False, inputs_checked: bool = False) -> dict:
    """Run `suite` with `backend`; return results.json's content (written on the main process).

    `progress`: one bar per benchmark and a summary line when it ends, on stderr of the main process.
    `verbose`: lm-eval's own progress bars too (its logging is commands.py's `--verbose`).
    `inputs_checked`: the caller ran `check_inputs` already (before loading the model).
    """
    out = Path(out)
    model = backend.describe()
    if not inputs_checked:
        check_inputs(suite, data_dir, images_dirs)
    check_image_input(suite, model["backend"], model.get("path"), getattr(backend, "image_problem", None))
    check_same_model(model, dist)
    with locked_run_dir(out, dist):  # held until the last write
        identity = run_identity(suite, model, limit=limit, images_dirs=images_dirs, data_dir=data_dir)
        kept, kept_files = _earlier_results(out, model, identity, suite) if dist.is_main else ({}, {})
        claim_run_dir(out, model, dist, identity, suite.to_dict())
        store = RecordStore(out / "cache", shard=f"rank{dist.rank}")
        # (responses has no batch size: 32, as run --help says)
        lm = ResumableLM(backend, store, dist, chunk_size=chunk_size or 4 * getattr(backend, "batch_size", 8))
        results = {
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "model": model,
            "suite": suite.to_dict(),
            # paths absolute: a rerun without run.json compares them, maybe from another directory
            "overrides": {"limit": limit, "images_dirs": {k: _where(v) for k, v in (images_dirs or {}).items()},
                          "data_dir": _where(data_dir)},
            "identity": identity,  # run.json's: a rerun without run.json compares it
            "seeds": {"suite": suite.seed},
            "packages": package_versions(),
            "run": {"started_at": _now(), "finished_at": None, "command": command, "world_size": dist.world_size},
            "data_files": kept_files,  # until complete: the kept entries' files too (read: this run's alone)
            "benchmarks": kept,  # each replaced as its benchmark finishes
        }
        read = {}
        if dist.is_main:
            (out / "samples").mkdir(exist_ok=True)
        width = max(len(spec.name) for spec in suite.benchmarks)
        asked_hashes, asked_items = set(), set()  # every request's keys, cached or not: for unused_inputs
        for spec in suite.benchmarks:
            started, computed = time.perf_counter(), lm.computed
            lm.failures.clear()
            with BenchmarkProgress(spec.name, enabled=progress and dist.is_main, width=width,
                                   placeholder=not verbose) as bar:
                lm.progress = bar
                if spec.kind == "captioning":
                    entry, records = run_captioning(spec, lm, images_dir=(images_dirs or {}).get(spec.benchmark),
                                                    limit=limit, seed=suite.seed)
                else:
                    entry, records = _run_text(spec, lm, limit=limit, data_dir=data_dir, seed=suite.seed,
                                               lm_eval_bars=verbose and dist.is_main)
                for rec in records:
                    asked_items.add(rec["item_id"])
                    asked_hashes.update(h for h in rec.get("request_hashes") or [rec.get("request_hash")] if h)
                files = {display_path(k): v for k, v in entry.pop("data_files").items()}
                read.update(files)
                results["data_files"].update(files)
                entry["config"] = {k: v for k, v in spec.__dict__.items()}
                entry["seconds"] = round(time.perf_counter() - started, 2)
                # not answered from the cache, by every process (each computes its share)
                entry["computed_requests"] = sum(dist.all_gather(lm.computed - computed))
                lm.progress = None
            if dist.is_main:
                entry["samples_file"] = f"samples/{spec.name}.jsonl"
                entry["samples_sha256"] = write_jsonl_atomic(out / entry["samples_file"], records)
                results["benchmarks"][spec.name] = entry
                results["benchmarks"] = {s.name: results["benchmarks"][s.name] for s in suite.benchmarks
                                         if s.name in results["benchmarks"]}  # suite order, kept entries or not
                write_json_atomic(out / "results.json", results)
                if progress:
                    print(summary_line(spec.name, entry, cached=bar.cached, width=width), file=sys.stderr, flush=True)
        unused = backend.unused_inputs(asked_hashes, asked_items)
        if unused and dist.is_main:
            print(f"warning: {unused}", file=sys.stderr, flush=True)
        results["complete"] = True
        results["data_files"] = read
        results["run"]["finished_at"] = _now()
        if dist.is_main:
            write_json_atomic(out / "results.json", results)
        store.close()
        dist.barrier()
        return results


def item_hash(task: str, doc_hash: str, occurrence: int = 0) -> str:
    """A text item's key across runs (SCHEMA.md): its task and content, and for a repeated item its
    occurrence (the first keeps the plain key)."""
    key = f"{task}\n{doc_hash}" + (f"\n{occurrence}" if occurrence else "")
    return hashlib.sha256(key.encode()).hexdigest()


def _run_text(spec: BenchmarkSpec, lm: ResumableLM, *, limit, data_dir, seed,
              lm_eval_bars: bool = False) -> tuple[dict, list[dict]]:
    from benchmarks.text.run import request_kind, run_text_benchmark

    maj_at = tuple(spec.maj_at) if spec.maj_at else None
    limit = min([x for x in (limit, spec.limit) if x is not None], default=None)
    with as_single_process():
        res = run_text_benchmark(lm, spec.benchmark, data_dir=data_dir, num_fewshot=spec.shots, k=spec.k,
                                 maj_at=maj_at, limit=limit, gen_kwargs=spec.generation or None, seed=seed,
                                 lm_eval_bars=lm_eval_bars)
    gen_hash = parse_gen_kwargs(spec.generation).digest() if spec.generation else None
    # A dataset may hold an item twice (the full MMLU test set: 27 questions within their subject):
    # the occurrences after the first, in dataset order, count in their key, so that two runs join
    # one to one (a prefix by --limit keeps each occurrence's number).
    docs: dict[tuple[str, str], set[int]] = {}
    for s in res.samples:
        docs.setdefault((s["task"], s["doc_hash"]), set()).add(s["doc_id"])
    occurrence = {(task, doc_id): n for (task, _), ids in docs.items() for n, doc_id in enumerate(sorted(ids))}
    records, items, failed_items = [], set(), set()
    for s in res.samples:  # a failed item is scored 0 already (score_failures_wrong)
        item_id = f"{s['task']}/{s['doc_id']}"
        items.add(item_id)
        if s["failure"]:
            failed_items.add(item_id)
        kind = request_kind(res.task_configs[s["task"]]["output_type"])
        gen = s["arguments"][0][1] if kind == "generate_until" and s["arguments"] else None
        records.append({
            "benchmark": spec.name, "item_id": item_id, "filter": s["filter"],
            "item_hash": item_hash(s["task"], s["doc_hash"], occurrence[s["task"], s["doc_id"]]),
            "request_hashes": s["request_hashes"], "prompt": s["prompt"], "images": [],
            "output": s["resps"], "filtered_output": s["filtered_resps"], "target": s["target"],
            "score": s["scores"], "doc": s["doc"],
            "generation_hash": parse_gen_kwargs(gen).digest() if gen else None,
            "failed": bool(s["failure"]), **({"failure": s["failure"]} if s["failure"] else {}),
        })
    entry = {
        "benchmark": spec.benchmark, "kind": "text", "primary_metric": res.primary,
        "n_items": len(items), "n_failed": len(failed_items),
        "metrics": {k: metric_entry(m["value"], m["stderr"], m["n"]) for k, m in res.metrics.items()},
        "generation_hash": gen_hash, "lm_eval": res.lm_eval, "task_configs": res.task_configs,
        "data_files": res.data_files,
    }
    return entry, records
