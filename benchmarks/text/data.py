"""Local benchmark files -> `datasets.DatasetDict`, validated row by row.

The task YAMLs name their files relative to a data directory (`dataset_kwargs.data_files`) and
load them through `custom_dataset: !function benchmarks.text.data.load_<layout>`. lm-eval calls
these with the task's `metadata` merged in, so `data_dir` comes from
`TaskManager(metadata={"data_dir": ...})` or `lm_eval --metadata '{"data_dir": ...}'`; without
it the small subsets shipped in `benchmarks/data/` are used. Absolute `data_files` are taken as is.

Rows are checked here, not deep inside lm-eval, so a malformed file fails with an `InputError`
naming the file, the row and the field.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import datasets

from chameleon.errors import InputError

SHIPPED_DATA_DIR = Path(__file__).resolve().parents[1] / "data"

MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
# What a data file must be, by the suffix the task YAMLs give it (for errors)
FILE_FORMATS = {".jsonl": "a JSON Lines file (one JSON object per line)",
                ".csv": f"a CSV file with header {','.join(MMLU_HEADER)}"}

# The `type` values of the MATH test split, in the order of lm-eval's minerva_math subtasks.
MATH_SUBJECTS = {
    "algebra": "Algebra",
    "counting_and_prob": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "num_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalc": "Precalculus",
}


def resolve_data_files(data_files: dict[str, str], data_dir: str | Path | None = None) -> dict[str, Path]:
    """Map each split's file to an existing path: relative names are looked up under `data_dir`."""
    base = Path(data_dir).expanduser() if data_dir else SHIPPED_DATA_DIR
    if not base.is_dir():
        raise InputError(f"data_dir {str(base)!r} is not a directory")
    resolved = {}
    for split, name in data_files.items():
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        if path.is_dir():  # "not found" would send the user looking for a file that is there
            raise InputError(
                f"{split} file {str(path)!r} is a directory; expected {name!r} under data_dir {str(base)!r} to be "
                f"{FILE_FORMATS.get(path.suffix, 'a file')} (same layout as benchmarks/data/)"
            )
        if not path.is_file():
            raise InputError(
                f"{split} file {str(path)!r} not found; expected {name!r} under data_dir {str(base)!r} "
                f"(same layout as benchmarks/data/)"
            )
        resolved[split] = path
    return resolved


def check_task_data(tasks: dict[str, int], data_dir: str | Path | None = None) -> None:
    """Load every file the lm-eval tasks `tasks` (groups and tags expanded) read, through their
    loaders: a bad file fails here, before a model is loaded or a run directory claimed. `tasks`
    maps each task to its number of shots: a task drawing them from a few-shot split of its data
    (MMLU's dev files) must have that many rows there (lm-eval fails with an AssertionError)."""
    from benchmarks.text.run import text_task_manager

    index = text_task_manager(data_dir).task_index
    todo = list(tasks.items())
    seen: dict[str, int] = {}
    while todo:
        name, shots = todo.pop()
        entry = index[name]
        if entry.name in seen and seen[entry.name] >= shots:
            continue
        seen[entry.name] = shots
        cfg = entry.cfg or {}
        if entry.kind.name == "TAG":
            todo += [(t, shots) for t in entry.tags]  # a tag's entry lists its member tasks
        elif entry.kind.name == "GROUP":
            todo += [(t, shots) for t in cfg.get("task", []) if isinstance(t, str)]
        elif isinstance(cfg.get("custom_dataset"), str):  # "<yaml dir>/benchmarks.text.data.load_<layout>"
            loader = globals().get(cfg["custom_dataset"].rsplit(".", 1)[-1])
            if callable(loader):
                kwargs = {**cfg.get("dataset_kwargs", {}), "data_dir": data_dir}
                splits = loader(**kwargs)
                pool = cfg.get("fewshot_split")
                if shots and pool in splits and len(splits[pool]) < shots:
                    path = resolve_data_files(kwargs["data_files"], data_dir)[pool]
                    raise InputError(f"{path}: {len(splits[pool])} row(s) in the few-shot ({pool}) split of "
                                     f"{entry.name}; {shots}-shot prompts need at least {shots}")


def _read_text(path: Path) -> str:
    """The file's text; not UTF-8 -> InputError naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8") from None


def _rows_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with io.StringIO(_read_text(path), newline=None) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _require_str(path: Path, lineno: int, row: dict, fields: tuple[str, ...]) -> None:
    for field in fields:
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise InputError(f"{path}: line {lineno}: field {field!r} must be a non-empty string")


def _require_boxed(path: Path, lineno: int, solution: str) -> None:
    # lm-eval's minerva process_docs takes the gold answer from the last \boxed{} of the solution.
    from lm_eval.tasks.minerva_math.utils import last_boxed_only_string

    boxed = last_boxed_only_string(solution)
    if boxed is None or not (boxed.startswith("\\boxed{") or boxed.startswith("\\boxed ")):
        raise InputError(f"{path}: line {lineno}: field 'solution' has no \\boxed{{...}} final answer")


def _dataset_dict(splits: dict[str, list[dict]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def load_gsm8k(data_files: dict[str, str], data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """GSM8K jsonl: `question`, `answer` (worked solution ending in `#### N`)."""
    splits = {}
    for split, path in resolve_data_files(data_files, data_dir).items():
        rows = []
        for lineno, row in _rows_jsonl(path):
            _require_str(path, lineno, row, ("question", "answer"))
            if "####" not in row["answer"]:
                raise InputError(f"{path}: line {lineno}: field 'answer' must end with '#### <number>'")
            rows.append(row)
        splits[split] = rows
    return _dataset_dict(splits)


def load_math(
    data_files: dict[str, str], data_dir: str | None = None, subject: str | None = None, **_: Any
) -> datasets.DatasetDict:
    """MATH jsonl: `problem`, `solution` with a final \\boxed{} (MATH-500 or the full test split).

    `subject` keeps only rows whose `type` (full split) or `subject` (MATH-500) is that MATH
    subject, e.g. "Algebra". Rows are passed on unchanged, as lm-eval's json loader would.
    """
    splits = {}
    for split, path in resolve_data_files(data_files, data_dir).items():
        rows = []
        for lineno, row in _rows_jsonl(path):
            _require_str(path, lineno, row, ("problem", "solution"))
            _require_boxed(path, lineno, row["solution"])
            row_subject = row.get("type", row.get("subject"))
            if subject is not None:
                if row_subject not in MATH_SUBJECTS.values():
                    raise InputError(
                        f"{path}: line {lineno}: field 'type' must be one of {sorted(MATH_SUBJECTS.values())}, "
                        f"got {row_subject!r}"
                    )
                if row_subject != subject:
                    continue
            rows.append(row)
        if not rows:
            raise InputError(f"{path}: no rows with type {subject!r}")
        splits[split] = rows
    return _dataset_dict(splits)


def load_mmlu(data_files: dict[str, str], data_dir: str | None = None, subject: str = "", **_: Any) -> datasets.DatasetDict:
    """MMLU csv with header `question,choice0..choice3,answer` (answer 0-3) -> cais/mmlu columns."""
    splits = {}
    for split, path in resolve_data_files(data_files, data_dir).items():
        with io.StringIO(_read_text(path), newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header != MMLU_HEADER:
                raise InputError(f"{path}: header must be {','.join(MMLU_HEADER)}, got {header}")
            rows = []
            for record in reader:
                where = f"{path}: line {reader.line_num}"
                if len(record) != len(MMLU_HEADER):
                    raise InputError(f"{where}: expected {len(MMLU_HEADER)} columns, got {len(record)}")
                if record[5].strip() not in ("0", "1", "2", "3"):
                    raise InputError(f"{where}: field 'answer' must be 0, 1, 2 or 3, got {record[5]!r}")
                if not record[0].strip():
                    raise InputError(f"{where}: field 'question' is empty")
                rows.append(
                    {"question": record[0], "subject": subject, "choices": record[1:5], "answer": int(record[5])}
                )
        if not rows:
            raise InputError(f"{path}: no rows")
        splits[split] = rows
    return _dataset_dict(splits)
