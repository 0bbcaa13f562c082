"""Whether building a model loads weights: the switch behind ``no_weight_loading()``.

``python -m t2i_train.summary`` builds every model on the meta device to count parameters, and
``t2i_train.checkpoint.load_family`` rebuilds a family whose every weight is in the checkpoint. Both build
under ``no_weight_loading()``: families, text encoders and losses consult ``weight_loading_enabled()`` before
calling ``from_pretrained`` or reading a stage-1 checkpoint, and build the same architecture from its
configured dimensions instead.
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
