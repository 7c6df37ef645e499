"""The one exception type for user errors.

A :class:`LoopgraphError` is something the user can fix (a bad path, a bad range, a model
loopgraph cannot handle). The CLI prints it as one line and exits with code 2. Anything else
is a bug and keeps its traceback.
"""


class LoopgraphError(Exception):
    """A user-facing error: its message names the problem, the evidence and the fix."""
