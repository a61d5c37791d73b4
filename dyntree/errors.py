"""One exception type for every user-facing failure.

The CLI turns a `DynTreeError` into a single line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class DynTreeError(Exception):
    """Bad input or an unusable model/heads/tree: the message is meant for the user, in one line."""
