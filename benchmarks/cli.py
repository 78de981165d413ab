"""`chameleon-bench`: the project's one command line.

Each feature registers its own subcommands from the module listed in COMMAND_MODULES: a module
exposes `register(subparsers)` and sets `func` on its parsers. `InputError` becomes exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chameleon.errors import InputError

COMMAND_MODULES = [
    "chameleon.commands",  # generate, convert
    "benchmarks.demo",  # demo (make demo)
    "benchmarks.captioning.commands",  # score-captions
    "benchmarks.runner.commands",  # run
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chameleon-bench",
        description="Reference Chameleon stack and evaluation harness for mixed-modal early-fusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except InputError as err:
        # one write: under torchrun every process may report at once, and print's two writes
        # (text, then newline) of two processes could run together on one line
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
