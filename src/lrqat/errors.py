"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a corrupt checkpoint) is raised
as `LrqatError` with a message that names the bad value and the fix. The CLI prints
these without a traceback; everything else is a bug and keeps its traceback.
"""


class LrqatError(Exception):
    """A problem with the user's input or environment, explained in the message."""
