"""Switch for building models without loading any pretrained or stage-1 weights.

``python -m t2i_train.summary`` builds every model on the meta device to count parameters; families consult
``weight_loading_enabled()`` before calling ``from_pretrained`` or reading a ``*_checkpoint`` path and build
the same architecture from its configured dimensions instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_LOADING_ENABLED: ContextVar[bool] = ContextVar("t2i_weight_loading_enabled", default=True)


def weight_loading_enabled() -> bool:
    return _LOADING_ENABLED.get()


@contextmanager
def no_weight_loading() -> Iterator[None]:
    token = _LOADING_ENABLED.set(False)
    try:
        yield
    finally:
        _LOADING_ENABLED.reset(token)
