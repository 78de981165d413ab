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


def expect_error(path, *fragments):
    """Loading `path` fails with an InputError whose message holds every fragment."""
    import chameleon
    from chameleon.errors import InputError

    with pytest.raises(InputError) as err:
        chameleon.load(path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def cut_at_stop_strings(decode, rows: list[list[int]], stops: tuple[str, ...]) -> list[list[int]]:
    """Each row cut after its first token whose last 64 tokens decode to a text holding one of
    `stops`: the stop-string rule, written out independently of chameleon.generate."""

    def cut(row):
        for j in range(len(row)):
            if any(s in decode(row[max(0, j - 63) : j + 1]) for s in stops):
                return row[: j + 1]
        return row

    return [cut(row) for row in rows]


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
