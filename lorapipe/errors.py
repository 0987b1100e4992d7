"""Errors a step reports in one line, without a traceback.

See cli.main_guard. No dependencies, so any module (msckpt needs numpy only) can raise them."""


class StepError(Exception):
    """A step failed for a reason its message explains fully."""


class InputError(StepError, ValueError):
    """Bad input: the message names the file, record or tensor and what was expected."""


class ConfigError(InputError):
    """A config file or value that cannot be used; the message names the file and the key."""
