"""The CLI's exit statuses and the two errors ``main`` turns into one ``error: ...`` line."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command line: reported as one ``error: ...`` line, exit status 2."""


class Failure(Exception):
    """Something that is not the user's fault (e.g. the model could not be fetched): one
    ``error: ...`` line, exit status 1."""
