"""Pre-computed outputs of an external system (e.g. an API model), scored exactly like ours.

The file is JSONL, one response per line, keyed by `request_hash` (lm-eval's hash of the request,
as written in our per-sample records) or by `item_id`, as the samples file records it:
"<task>/<doc_id>" for text, the image id for captioning. A loglikelihood is looked up by
`request_hash` only: one item asks one per choice (MMLU's " A".." D").

    {"request_hash": "9f2c...", "output": "The answer is 42."}
    {"item_id": "chameleon_gsm8k_cot_maj/17", "sample": 3, "output": "..."}   # sample k of maj@k (from 0)
    {"item_id": "199783", "output": "A cat on a couch."}                        # a COCO caption
    {"request_hash": "...", "loglikelihood": -3.2, "is_greedy": false}

An output ends before the earliest occurrence of any of the request's stop strings (`until`), as every backend's does.
A request without a response is a per-item failure (recorded in `failures`, empty output /
-inf loglikelihood), never a crash; lines no request of a run asked for are reported once at its
end (`unused_inputs`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lm_eval.api.registry import register_model

from benchmarks.backends.base import (MixedModalLM, instance_hash, item_id, parse_gen_kwargs, sample_indices,
                                     truncate_at_stops)
from chameleon.errors import InputError, unicode_problem


def _is_text(v) -> bool:
    return isinstance(v, str) and unicode_problem(v) is None


# Each field's test and what it must be (a wrong type is refused, never coerced).
FIELDS = {
    "request_hash": (lambda v: isinstance(v, str) and v != "", "a non-empty string (lm-eval's request hash)"),
    "item_id": (lambda v: isinstance(v, str) and v != "", 'a non-empty string: "<task>/<doc_id>", or the image id for captioning'),
    "sample": (lambda v: type(v) is int and v >= 0, "a non-negative integer"),
    "output": (_is_text, "a string of valid Unicode text (no lone surrogate such as \\ud800)"),
    "loglikelihood": (lambda v: type(v) in (int, float) and v <= 0, "a number <= 0 (a log-probability)"),
    "is_greedy": (lambda v: isinstance(v, bool), "true or false"),
}
RESPONSE_FIELDS = {"output": None, "loglikelihood": None, "is_greedy": False}  # with the value an absent one means


@register_model("responses")
class ResponsesBackend(MixedModalLM):
    backend_name = "responses"

    def __init__(self, pretrained: str, **_: object) -> None:
        super().__init__()
        self.path = Path(pretrained)
        if not self.path.is_file():
            raise InputError(f"--model {pretrained}: expected a responses JSONL file")
        raw = self.path.read_bytes()
        self._fingerprint = "responses:" + hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise InputError(f"{self.path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        self.by_hash: dict[tuple[str, int], dict] = {}
        self.by_item: dict[tuple[str, int], dict] = {}
        self.keys: list[tuple[int, str | None, str | None]] = []  # (line, request_hash, item_id) of each response
        seen: dict[tuple, tuple[int, tuple]] = {}  # (field, value, sample) -> (line, response)
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{self.path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict) or not ({"request_hash", "item_id"} & rec.keys()):
                raise InputError(f"{self.path}:{n}: expected an object with 'request_hash' or 'item_id'")
            if not ({"output", "loglikelihood"} & rec.keys()):
                raise InputError(f"{self.path}:{n}: expected 'output' (generation) or 'loglikelihood'")
            for name, (ok, expected) in FIELDS.items():
                if name in rec and not ok(rec[name]):
                    raise InputError(f"{self.path}:{n}: field {name!r} must be {expected}, got {rec[name]!r:.80}")
            sample = rec.get("sample", 0)
            self.keys.append((n, rec.get("request_hash"), rec.get("item_id")))
            response = tuple(rec.get(k, absent) for k, absent in RESPONSE_FIELDS.items())
            for field, table in (("request_hash", self.by_hash), ("item_id", self.by_item)):
                if field in rec:
                    # A repeat (samples files hold one record per filter) is fine; a different answer is not.
                    first, earlier = seen.setdefault((field, rec[field], sample), (n, response))
                    if earlier != response:
                        raise InputError(f"{self.path}:{n}: {field} {rec[field]!r} sample {sample} has another "
                                         f"response on line {first}; expected one per request and sample")
                    table.setdefault((rec[field], sample), rec)
        if not seen:
            raise InputError(f"{self.path}: holds no responses; expected one JSON object per line")

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path)}

    def unused_inputs(self, request_hashes: set[str], item_ids: set[str]) -> str | None:
        unused = [(n, h, i) for n, h, i in self.keys if h not in request_hashes and i not in item_ids]
        if not unused:
            return None
        shown = "; ".join(f"line {n}: " + (f"request_hash {h!r}" if h else f"item_id {i!r}") for n, h, i in unused[:3])
        return (f"{self.path}: {len(unused)} response line(s) matched no request of this run ({shown}"
                f"{'; ...' if len(unused) > 3 else ''}): keys are the samples files' request_hash or item_id "
                f"(the image id for captioning)")

    def _lookup(self, kind: str, req, sample: int, field: str) -> dict | None:
        """The response record holding `field` for this request (by request hash, else by item)."""
        h = instance_hash(req, kind)
        item = item_id(req)
        rec = self.by_hash.get((h, sample))
        if rec is None and kind != "loglikelihood":
            rec = self.by_item.get((item, sample))
        if rec is None or field not in rec:
            why = f"no '{field}' response for request {h[:12]} (item {item})"
            if kind == "loglikelihood" and field in self.by_item.get((item, sample), {}):
                why += "; a loglikelihood response needs the request_hash: an item asks one per choice"
            self.failures[h] = why
            return None
        return rec

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            found = self._lookup("loglikelihood", req, 0, "loglikelihood")
            rec = (float("-inf"), False) if found is None else (float(found["loglikelihood"]), found.get("is_greedy", False))
            out.append(rec)
            if found is not None:
                self.cache_hook.add_partial("loglikelihood", req.args, rec)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            found = self._lookup("loglikelihood_rolling", req, 0, "loglikelihood")
            out.append(float("-inf") if found is None else float(found["loglikelihood"]))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False,
                       sample_index: list[int] | None = None) -> list[str]:
        sample_index = sample_index if sample_index is not None else sample_indices(requests)
        out = []
        for req, k in zip(requests, sample_index):
            found = self._lookup("generate_until", req, k, "output")
            # cut at the request's stop strings, as our model's outputs are (and an API's, given
            # them as `stop`): an output that runs on into the next "Q:" is scored like ours
            until = parse_gen_kwargs(req.args[1]).until
            out.append("" if found is None else truncate_at_stops(found["output"], until))
            if found is not None:
                self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out
