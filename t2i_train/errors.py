"""Exceptions that the CLIs turn into one clear line and a non-zero exit."""


class T2IError(Exception):
    """Base class of errors a user can fix: the message says what is wrong and what to do."""


class ConfigError(T2IError):
    """A configuration that cannot work (unknown option, loss the family does not accept, ...)."""


class DataError(T2IError):
    """Missing, empty or too-corrupt data."""


class CheckpointError(T2IError):
    """A checkpoint that is missing or does not hold what is asked of it."""
