"""The one exception type for user errors.

A :class:`LoopgraphError` is something the user can fix (a bad path, a bad range, a model
loopgraph cannot handle). The CLI prints it as one line and exits with code 2. Anything else
is a bug and keeps its traceback.
"""

import errno

#: errors of a write that the user can fix (room, permissions, a read-only mount): printed as one line
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class LoopgraphError(Exception):
    """A user-facing error: its message names the problem, the evidence and the fix."""
