"""Subcommands of this package (filled in by its feature)."""


def register(subparsers) -> None:  # noqa: ARG001
    return None
