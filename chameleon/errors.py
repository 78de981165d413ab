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
