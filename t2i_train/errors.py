"""Exceptions that the CLIs turn into one clear line and a non-zero exit, and the exit codes they use.

Exit codes of every ``python -m t2i_train...`` command:

- ``0``: finished.
- ``1``: a crash (a bug, or an error no rule here recognises): the traceback is printed.
- ``2`` (:data:`EXIT_USER_ERROR`): something the user can fix (config, data, checkpoint, a diverged run); one
  ``error:`` line on stderr says what is wrong and what to do.
- ``3`` (``t2i_train.run_state.LostRank``): another process of a distributed run died; the line names it and the
  ``resume=auto`` command that continues from the newest checkpoint.
- ``75`` (:data:`EXIT_STOPPED`, ``EX_TEMPFAIL``): training was told to stop (SIGTERM, SIGUSR1), saved
  ``last.ckpt`` and exited before ``trainer.max_steps``; run the same command with ``resume=auto`` to continue.
  A scheduler or an ``&&`` chain must not read this as "finished".
"""

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75


class T2IError(Exception):
    """Base class of errors a user can fix: the message says what is wrong and what to do."""


class ConfigError(T2IError):
    """A configuration that cannot work (unknown option, loss the family does not accept, ...)."""


class DataError(T2IError):
    """Missing, empty or too-corrupt data."""


class CheckpointError(T2IError):
    """A checkpoint that is missing, unreadable, unsafe to load, or does not hold what is asked of it."""


class TrainingDiverged(T2IError):
    """The loss (or the gradients) stayed non-finite for more steps than ``nonfinite.max_consecutive`` allows.

    Raised on every rank at the same step (the decision is all-reduced), so only rank 0 reports it.
    """

    collective = True
