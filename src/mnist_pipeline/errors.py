"""Expected failures: these print one clear message and exit non-zero, never a traceback."""


class PipelineError(Exception):
    """A failure the user can act on (bad input, bad config, missing upstream output)."""


class ConfigError(PipelineError):
    """The configuration is invalid; the message names the key."""


class DataError(PipelineError):
    """Input data is missing, malformed or fails verification."""
