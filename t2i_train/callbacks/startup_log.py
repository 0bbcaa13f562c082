"""Hold Lightning's start-up chatter until training starts, so a start-up error prints its one line only.

Between ``begin()`` (the start of the training CLI's job) and the first ``on_train_start`` the records of the
``lightning`` loggers ("GPU available: ...", "TPU available: ...", "`Trainer(limit_val_batches=...)` was
configured ...", "Seed set to 0", the tips), the Python warnings and what Rich prints (the model summary) are
kept in memory. ``StartupLog.on_train_start`` (add ``startup_log_callback()`` to the Trainer's callbacks, first)
prints them, in order; a user error before that ``drop()``s them, a crash ``flush()``es them before its traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
#: Python warnings from inside the libraries that a user cannot act on (held back like the rest, then dropped)
INTERNAL_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class DropTips(logging.Filter):
    """Drops Lightning's advertising ("💡 Tip: ... try installing litlogger / litmodels"): a handler filter, since
    the records come from child loggers (``lightning.pytorch.utilities.rank_zero``) and propagate."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") or "litlogger" in message or "litmodels" in message)


def route_library_logs(handlers: list[logging.Handler] | None = None) -> None:
    """Lightning's loggers hand their records to the root's handlers (one line each, one format) instead of
    printing them a second time with their own; ``handlers`` (default: the root's) drop the tips."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        if not any(isinstance(f, DropTips) for f in handler.filters):
            handler.addFilter(DropTips())


class _Held(logging.Handler):
    """Appends every record to the shared event list."""

    def __init__(self, events: list[Callable[[], None]], cut: Callable[[], None]) -> None:
        super().__init__(level=logging.NOTSET)
        self.events, self.cut = events, cut

    def emit(self, record: logging.LogRecord) -> None:
        self.cut()
        self.events.append(lambda: logging.getLogger(record.name).handle(record))


class StartupBuffer:
    """What ``begin`` .. ``flush``/``drop`` held back: log records, warnings and Rich output, in order."""

    def __init__(self) -> None:
        self.active = False
        #: set once training started (``flush`` from ``on_train_start``): later errors are not start-up errors
        self.training_started = False
        self.events: list[Callable[[], None]] = []
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}
        self._showwarning: Any = None
        self._console: Any = None

    def begin(self) -> None:
        if self.active:
            return
        self.active, self.training_started, self.events = True, False, []
        handler = _Held(self.events, self._cut_console)
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = (list(logger.handlers), logger.propagate)
            logger.handlers, logger.propagate = [handler], False
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._hold_warning
        self._console = _rich_console()
        if self._console is not None:
            self._console.begin_capture()

    def flush(self, training_started: bool = False) -> None:
        """Print what was held (and stop holding)."""
        events = self._stop()
        self.training_started = self.training_started or training_started
        for event in events:
            event()
        sys.stdout.flush()

    def drop(self) -> None:
        """Forget what was held (and stop holding): a start-up error prints its own line only."""
        self._stop()

    def _stop(self) -> list[Callable[[], None]]:
        if not self.active:
            return []
        self._cut_console()
        if self._console is not None:
            self._console.end_capture()
        for name, (handlers, propagate) in self._saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        warnings.showwarning = self._showwarning
        self.active, self._saved, self._console = False, {}, None
        events, self.events = self.events, []
        return events

    def _hold_warning(self, *args: Any, **kwargs: Any) -> None:
        if args and any(re.search(pattern, str(args[0])) for pattern in INTERNAL_WARNINGS):
            return
        self._cut_console()
        original = self._showwarning
        self.events.append(lambda: original(*args, **kwargs))

    def _cut_console(self) -> None:
        """Move what Rich captured so far into the event list, so it keeps its place among the records."""
        if self._console is None:
            return
        text = self._console.end_capture()
        self._console.begin_capture()
        if text:
            console = self._console
            self.events.append(lambda: (console.file.write(text), console.file.flush()))


def _rich_console() -> Any:
    try:
        from rich import get_console
    except ImportError:
        return None
    return get_console()


#: the process's buffer (the training CLI starts it; ``StartupLog`` flushes it)
STARTUP = StartupBuffer()


class StartupLog(L.Callback):
    """Print the held start-up output when training starts (see the module docstring)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STARTUP.flush(training_started=True)


def startup_log_callback() -> StartupLog:
    """The callback ``train()`` puts first in the Trainer's callbacks."""
    return StartupLog()
