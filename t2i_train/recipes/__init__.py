"""Multi-stage recipes (``python -m t2i_train.pipeline --recipe NAME``): one module per recipe.

Every module of this package that defines ``RECIPE`` (a :class:`t2i_train.recipes.base.Recipe`) is a recipe,
found by :func:`available`; adding a recipe is adding a module here, with no other file to edit. Modules
without ``RECIPE`` (``base``, ``stages``, ``report``) hold what recipes share.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from t2i_train.errors import ConfigError
from t2i_train.recipes.base import Recipe

DEFAULT = "muse"


@functools.cache
def available() -> dict[str, Recipe]:
    """Name -> recipe, for every module of this package that defines ``RECIPE``, sorted by name."""
    found: dict[str, Recipe] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        recipe = getattr(module, "RECIPE", None)
        if recipe is None:
            continue
        if not isinstance(recipe, Recipe):
            raise TypeError(f"{module.__name__}.RECIPE is a {type(recipe).__name__}, not a Recipe")
        if recipe.name in found:
            raise ValueError(f"two recipes named {recipe.name!r} ({module.__name__} and another module)")
        found[recipe.name] = recipe
    return dict(sorted(found.items()))


def get(name: str) -> Recipe:
    recipes = available()
    if name not in recipes:
        raise ConfigError(f"no recipe {name!r}; recipes: {', '.join(recipes)}")
    return recipes[name]
