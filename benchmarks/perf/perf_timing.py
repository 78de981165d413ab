"""Timing shared by the speed scripts beside this file (no torch here: caption_scoring.py runs
without it)."""

from __future__ import annotations


def in_turns(items: list, rounds: int):
    """Each item once per round, the order reversed every other round: on a shared machine whose
    speed drifts within minutes, competitors timed in turns see the same phases."""
    for r in range(rounds):
        yield from (items if r % 2 == 0 else items[::-1])
