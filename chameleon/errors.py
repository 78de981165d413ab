"""User-facing errors.

Anything the user can fix (a bad path, a malformed file, a wrong flag) raises `InputError`
with a message naming the file, field or flag and what was expected. The CLI turns it into
`error: ...` on stderr and exit status 2, without a traceback.
"""


class InputError(ValueError):
    """Bad input the user can fix: the message names what and where."""
