"""benchmarks/perf/decode.py's timing: its warm-up leaves no capture to a timed run."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import emulate_cuda_graphs

if os.environ.get("CI") != "true" and importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
from chameleon import kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not kernels.INTERPRETED, reason="CPU emulation of CUDA graphs (tests/conftest.py)")
def test_warm_up_captures_every_graph_the_timed_runs_replay(monkeypatch):
    """With graphs of N steps and fewer than 2N + 1 new tokens (the profile stage: 32 tokens,
    N = 16), one warm-up run spends its only N-step call on uncaptured warm-up steps, so the
    first timed run captured the N-step graph: the warm-up runs twice."""
    import dataclasses

    from chameleon.config import preset
    from chameleon.tiny import TINY_VQ, random_model

    sys.path.insert(0, str(REPO / "benchmarks" / "perf"))
    try:
        import decode
    finally:
        sys.path.remove(str(REPO / "benchmarks" / "perf"))
    model = random_model(dataclasses.replace(preset("tiny"), model_parallel_size=2), TINY_VQ, seed=1)
    model.transformer.fuse_()
    events = []
    emulate_cuda_graphs(monkeypatch, model.transformer, events)
    prompts = decode.random_prompts(model.tokenizer, 1, 8, seed=0).tolist()
    competitor = decode.ours_competitor(model, prompts, True, graph_steps=4, kernels="triton")
    timed = []
    real_run = competitor.run

    def run(n):  # the timed runs are the calls after the first yield's
        timed.append(events.count("capture"))
        return real_run(n)

    competitor.run = run
    for _ in decode.time_side_by_side([competitor], 1, 8, 8, torch.device("cpu"), repeats=1):
        pass
    assert events.count("capture") == 2  # graphs of 4 steps and of 1
    assert timed[-2] == timed[-1] == 2  # both captured before the timed runs (of 1, then 8 new tokens)
