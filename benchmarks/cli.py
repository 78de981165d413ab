"""`chameleon-bench`: the project's one command line.

Each feature registers its own subcommands from the module listed in COMMAND_MODULES: a module
exposes `register(subparsers)` and sets `func` on its parsers. `InputError` becomes exit 2, ^C
130, and a reader of stdout or stderr that went away (`| head`) 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import select
import signal
import sys

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
    parser.commands = sub.choices  # name -> subparser, for parse_args' errors
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args, but an unknown flag after a command is that command's error (argparse
    reports it with the top-level usage), naming the closest of its flags."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands[args.command]
        flags = [flag for action in command._actions for flag in action.option_strings]
        unknown = next((a.partition("=")[0] for a in extra if a.startswith("-")), "")
        meant = difflib.get_close_matches(unknown, flags, n=1)
        command.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {meant[0]}?" if meant else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    _reopen_closed_std_streams()
    try:
        # stdout to a pipe is buffered: flushed here, not by Python at exit, where a reader that is
        # gone gives 'Exception ignored ... BrokenPipeError' and exit 120
        try:
            status = _main(argv)
        except SystemExit:  # argparse's --help and usage errors
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return status
    except BrokenPipeError:  # stop without a traceback (which would go nowhere, or to the pipe)
        if not _discard_unwritable_output():
            raise  # not our stdout or stderr (a subprocess's pipe, a socket): a real failure
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    # The commands and the model stack (torch) are imported within, not with this module: that takes
    # seconds, and a ^C meanwhile is an interrupt like any other, not a traceback.
    try:
        args = parse_args(build_parser(), argv)
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        errors = sys.modules.get("chameleon.errors")  # (by module: its import may be what failed)
        if errors is None or not isinstance(err, errors.InputError):
            raise
        # one write: under torchrun every process may report at once, and print's two writes
        # (text, then newline) of two processes could run together on one line
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2
    return int(result or 0)


def _reopen_closed_std_streams() -> None:
    """stdout or stderr closed at start (`2>&-`) is None in sys, so writing to it (a progress bar,
    an error) failed, and its descriptor is free: the next file opened (a checkpoint, results.json)
    would take it, and C libraries' warnings land in it. Both become /dev/null instead."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            _to_devnull(fd)
            setattr(sys, name, open(fd, "w", errors="backslashreplace", closefd=False))


def _discard_unwritable_output() -> bool:
    """Whether stdout's or stderr's reader is gone; if so, that stream goes to /dev/null: Python's
    flush at exit would otherwise fail again, print 'Exception ignored ... BrokenPipeError' and
    exit 120."""
    gone = [stream for stream in (sys.stdout, sys.stderr) if _reader_gone(stream)]
    for stream in gone:
        _to_devnull(stream.fileno())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    return bool(gone)


def _reader_gone(stream) -> bool:
    """A pipe or socket whose reading end is closed polls as an error or hang-up. A stream without
    a descriptor (main called in a process that captures its output) has no reader to lose."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def _to_devnull(fd: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


if __name__ == "__main__":
    sys.exit(main())
