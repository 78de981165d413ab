"""The runner's view of a backend: cached, resumable and sharded request execution.

`ResumableLM` is itself an lm-eval `LM`. For each list of requests it answers what the run's
record store already holds, gives this process its contiguous share of the rest, runs it in
chunks and appends each finished chunk to the store (fsynced) before starting the next, then
gathers every process's answers. Keys hash the model fingerprint, the request (lm-eval's
`hash_args`, which covers the context, continuation, generation settings and image content) and
the sample index of sampled generations, so a cache can never answer for another checkpoint.
Failed requests (e.g. a missing external response) are never cached and are reported in
`failures`.
"""

from __future__ import annotations

import hashlib

from contextlib import nullcontext

from lm_eval.api.model import LM

from benchmarks.backends.base import MixedModalLM, instance_hash, parse_gen_kwargs, sample_indices
from benchmarks.runner.dist import Dist
from benchmarks.runner.store import RecordStore


class ResumableLM(LM):
    MULTIMODAL = True

    def __init__(self, backend: MixedModalLM, store: RecordStore, dist: Dist = Dist(), chunk_size: int = 32) -> None:
        super().__init__()
        self.backend = backend
        self.store = store
        self.dist = dist
        self.chunk_size = max(1, int(chunk_size))
        self.failures: dict[str, str] = {}  # request hash -> reason, as a backend's (of every process)
        self.computed = 0  # requests this process actually ran (not from the store)
        self.progress = None  # the current benchmark's BenchmarkProgress (runner/progress.py), if any

    def key(self, kind: str, req_hash: str, sample: int) -> str:
        raw = f"{self.backend.fingerprint}\n{kind}\n{req_hash}\n{sample}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [tuple(v) for v in self._run("loglikelihood", requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._run("loglikelihood_rolling", requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run("generate_until", requests)

    def _run(self, kind: str, requests) -> list:
        hashes = [instance_hash(r, kind) for r in requests]
        samples = [0] * len(requests)
        if kind == "generate_until":
            for i, (r, k) in enumerate(zip(requests, sample_indices(requests))):
                samples[i] = 0 if parse_gen_kwargs(r.args[1]).greedy else k  # greedy repeats agree
        keys = [self.key(kind, h, k) for h, k in zip(hashes, samples)]
        todo: dict[str, int] = {}  # key -> first request index, for keys not yet stored
        for i, k in enumerate(keys):
            if k not in self.store and k not in todo:
                todo[k] = i
        # contiguous shards keep neighbouring requests (one item's choices) in one process, so
        # the backend still shares their prefix
        pending = list(todo.values())
        n, w, r = len(pending), self.dist.world_size, self.dist.rank
        mine = pending[n * r // w: n * (r + 1) // w]
        fresh: dict[str, object] = {}
        failed: dict[str, str] = {}
        if self.progress is not None:
            self.progress.add(len(requests) - n + len(mine), cached=len(requests) - n)
        for start in range(0, len(mine), self.chunk_size):
            chunk = mine[start:start + self.chunk_size]
            reqs = [requests[i] for i in chunk]
            self.backend.failures.clear()
            with self.progress.chunk(len(chunk)) if self.progress is not None else nullcontext() as hook:
                self.backend.progress_hook = hook  # backends report per batch and draw no bars of their own
                try:
                    if kind == "generate_until":
                        values = self.backend.generate_until(reqs, sample_index=[samples[i] for i in chunk])
                    else:
                        values = getattr(self.backend, kind)(reqs)
                finally:
                    self.backend.progress_hook = None
            ok = []
            for i, v in zip(chunk, values):
                v = list(v) if isinstance(v, tuple) else v  # as JSON will store it
                if hashes[i] in self.backend.failures:
                    failed[hashes[i]] = self.backend.failures[hashes[i]]
                else:
                    ok.append((keys[i], v))
                fresh[keys[i]] = v
            self.store.put_many(ok)
            self.computed += len(chunk)
        for part in self.dist.all_gather((fresh, failed)):
            fresh.update(part[0])
            failed.update(part[1])
        self.failures.update(failed)
        return [self.store.get(k)["value"] if k in self.store else fresh[k] for k in keys]
