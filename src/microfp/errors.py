"""The one exception type users see: bad input, reported as one line and exit code 2 by the CLI."""


class MicrofpError(ValueError):
    """Bad input (parameters, files, checkpoints). The message is one line, naming what is wrong."""
