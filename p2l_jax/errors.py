"""The one exception type users see.

Every error caused by the user's input (a bad path, a corrupt file, a wrong option, a
checkpoint that does not match the architecture) is raised as :class:`P2LError` with a
message that names the problem: the file, the key, the shape or the option. The command line
prints that message on one line and exits non-zero, with no traceback.
"""


class P2LError(Exception):
    """A user-facing error whose message names the offending file, key, shape or option."""
