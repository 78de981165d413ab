"""User-facing errors.

Anything the user can fix (a bad path, a malformed file, a wrong flag) raises `InputError`
with a message naming the file, field or flag and what was expected. The CLI turns it into
`error: ...` on stderr and exit status 2, without a traceback.
"""


class InputError(ValueError):
    """Bad input the user can fix: the message names what and where."""


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode, or None. JSON can spell a lone surrogate ("\\ud800"),
    which no file, tokenizer or scorer downstream can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"{err.reason}: {text[err.start:err.end]!r} at character {err.start}"
    return None


def refuse_empty_paths(*given: tuple[str, str | None]) -> None:
    """(flag, path) pairs: an empty path (an unset shell variable) is Path("") = ".", the current
    directory, never what was meant (--out "" wrote there). None: a flag not given."""
    for flag, path in given:
        if path is not None and not str(path):
            raise InputError(f"{flag}: empty path")
