"""Append-only JSONL record store that survives `kill -9`.

Each record is one line written with a single `write` and fsynced before the next, so a kill
leaves at most one torn last line; it is dropped (and truncated away) on the next open. Records
are deduplicated by key, first one wins. Each process of a sharded run appends to its own file;
readers take the union of all files in the directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, ignoring a torn (unterminated or unparsable) last line."""
    out = []
    data = path.read_bytes() if path.exists() else b""
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # torn line from an interrupted write
    return out


class RecordStore:
    def __init__(self, directory: Path, shard: str = "0") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        for path in sorted(self.dir.glob("*.jsonl")):
            for rec in read_jsonl(path):
                self.records.setdefault(rec["key"], rec)
        self.path = self.dir / f"{shard}.jsonl"
        self._repair_tail()
        self._f = open(self.path, "ab")

    def _repair_tail(self) -> None:
        # drop a torn last line so the next append starts on a fresh line
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
            f.truncate(f.read().rfind(b"\n") + 1)

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
