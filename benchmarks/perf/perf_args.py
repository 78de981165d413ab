"""Argument types of the speed scripts beside this file: a bad value is argparse's error (exit 2,
naming the flag) before any work, not a traceback after minutes of it (or after a GPU lease)."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma list of positive integers, e.g. 1,4."""
    try:
        return [positive_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None


def names_of(*choices: str):
    """The type of a comma list of some of `choices`."""

    def names(text: str) -> list[str]:
        bad = [name for name in text.split(",") if name not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: expected a comma list of {', '.join(choices)}")
        return text.split(",")

    return names


def json_path(text: str) -> Path:
    """A file to write the report to, in a directory that exists (checked before the runs it reports)."""
    path = Path(text)
    if not path.parent.is_dir() or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: expected a file in an existing directory")
    return path


def device(text: str):
    """A torch device that exists here (chameleon.load's own check)."""
    from chameleon.chameleon import available_device
    from chameleon.errors import InputError

    try:
        return available_device(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_built(parser: argparse.ArgumentParser, flag: str, path: Path, asked: dict) -> None:
    """Reuse the checkpoint in `path` only if it was built with the `asked` ModelArgs values: the
    report states those, so figures of another shape would be silently mislabelled."""
    import dataclasses

    from chameleon.checkpoint import read_args
    from chameleon.errors import InputError

    def shown(args) -> str:  # n_kv_heads as used: a config may store n_heads' value as None (no GQA)
        return ", ".join(f"{name}={args.kv_heads if name == 'n_kv_heads' else getattr(args, name)}" for name in asked)

    try:
        built = read_args(path)
    except InputError as err:
        parser.error(f"argument {flag}: cannot reuse {path}: {err}")
    was, wanted = shown(built), shown(dataclasses.replace(built, **asked))
    if was != wanted:
        parser.error(f"argument {flag}: {path} holds a model built with {was}, not the {wanted} asked for; "
                     "give another directory, or empty this one")
