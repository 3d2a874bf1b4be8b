"""The one exception type users see: a clear message naming the file, layer or field at fault."""


class ClipqError(Exception):
    """A problem with the user's input or environment. The CLI prints it without a traceback and exits 2."""


class Interrupted(ClipqError):
    """A run stopped by Ctrl-C, SIGTERM or SIGHUP after saving what it had: the CLI exits 130, as for Ctrl-C."""
