"""Append-only JSONL record store that survives `kill -9`.

Each record is one line written with a single `write` and fsynced before the next, so a kill
leaves at most one torn last line; it is dropped (and truncated away) on the next open, while a
complete last record that only lacks its newline is kept and the newline added. Any other line
that is not a record (`{"key": str, "value": ...}`) is skipped with a warning: its request is
recomputed, and no other record is lost. Records are deduplicated by key, first one wins. Each
process of a sharded run appends to its own file; readers take the union of all files in the
directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def parse_record(line: bytes) -> dict | None:
    """The record on a line, or None for a torn or foreign one."""
    try:
        rec = json.loads(line)
    except ValueError:  # not JSON (e.g. torn by a kill), or not UTF-8
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), str) and "value" in rec else None


def read_records(path: Path) -> list[dict]:
    """Records of a store file. A torn last line (no newline) is dropped silently: a kill leaves one."""
    out = []
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = parse_record(line)
        if rec is not None:
            out.append(rec)
        elif lineno < len(lines):  # a complete line, so not an interrupted write
            print(f"warning: {path}: line {lineno} is not a cache record; ignored (its request will be recomputed)",
                  file=sys.stderr)
    return out


class RecordStore:
    def __init__(self, directory: Path, shard: str = "0") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        for path in sorted(self.dir.glob("*.jsonl")):
            for rec in read_records(path):
                self.records.setdefault(rec["key"], rec)
        self.path = self.dir / f"{shard}.jsonl"
        self._repair_tail()
        self._f = open(self.path, "ab")

    def _repair_tail(self) -> None:
        # end the file on a fresh line: a complete last record gets its newline, a torn one is dropped
        if not self.path.exists():
            return
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return  # the usual case, seen from the last byte alone
            f.seek(0)
            data = f.read()
            start = data.rfind(b"\n") + 1
            if parse_record(data[start:]) is not None:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            else:
                f.truncate(start)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put_many(self, items: list[tuple[str, object]]) -> None:
        """Append records and fsync once: after this returns they survive a kill."""
        recs = [{"key": k, "value": v} for k, v in items if k not in self.records]
        if not recs:
            return
        self._f.write(b"".join((json.dumps(r) + "\n").encode() for r in recs))
        self._f.flush()
        os.fsync(self._f.fileno())
        for r in recs:
            self.records[r["key"]] = r

    def close(self) -> None:
        self._f.close()
