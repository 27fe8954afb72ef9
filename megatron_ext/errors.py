"""One error type for everything a user can cause.

CLIs catch :class:`UserError` and print its message without a traceback, so
each message must say what went wrong *and* how to fix it.
"""


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, bad data)."""


class ConfigError(UserError):
    """Inconsistent or invalid command-line/configuration values."""


class TokenizerError(UserError):
    """The tokenizer cannot be loaded or cannot do what the run needs."""


class DataError(UserError):
    """Input data is missing, unreadable or entirely unusable."""


class CheckpointError(UserError):
    """A checkpoint or output directory is missing, incomplete, unreadable or in the way."""
