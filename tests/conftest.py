"""Shared fixtures: tiny Chameleon checkpoints the project builds itself (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data"
PHOTO = DATA / "images" / "skimage" / "chelsea.png"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random Chameleon in HF format (GQA, two model-parallel q/k-norm groups)."""
    from chameleon.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", "hf", seed=0)


@pytest.fixture(scope="session")
def tiny_meta(tmp_path_factory) -> Path:
    from chameleon.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "meta", "meta", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf):
    import chameleon

    return chameleon.load(tiny_hf)
