"""The errors kvprof raises on purpose, in one module that imports nothing, so any module (the
trace reader, an analysis, a plugin) can raise or catch them without pulling in the rest.

How the CLI reports them: a `UsageError` (and its subclasses) is the user's to fix, one line on
stderr and exit 2; a `SinkError` names the plugin whose sink failed, an OS error (`TraceWriteError`
included) is one line; both exit 1.
"""


class UsageError(Exception):
    """A user's mistake: the CLI prints the message as one line and exits 2."""


class TraceError(UsageError):
    """A trace that cannot be read: missing, empty, corrupt, not kvprof, or too new."""


class NotApplicable(UsageError):
    """The trace lacks what an analysis needs (say, retention probes). `kvprof analyze`
    skips such an analysis with a note unless the user asked for it by name (then: exit 2)."""


class TraceWriteError(OSError):
    """Writing the trace failed (disk full, file removed, ...); says where the events so far are."""


class SinkError(Exception):
    """A sink raised while handling an event; names the sink's plugin."""

    def __init__(self, plugin: str, kind: str, error: BaseException) -> None:
        super().__init__(f"sink {plugin!r} failed on a {kind} event: {type(error).__name__}: {error}")
        self.plugin = plugin
