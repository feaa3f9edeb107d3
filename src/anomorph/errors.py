"""User-facing error types. The CLI prints them without a traceback and exits with code 2."""


class AnomorphError(ValueError):
    """Base class of errors caused by the user's input."""


class DataError(AnomorphError):
    """Bad input data. The message names the manifest, the row and the file when known."""


class ConfigError(AnomorphError):
    """Invalid configuration; the message names the file and the key."""


class CheckpointError(AnomorphError):
    """A checkpoint that cannot be loaded safely or does not match its config."""


class NonFiniteLossError(AnomorphError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""
