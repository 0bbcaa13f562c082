"""Moved to ``t2i_train.models.loading`` (the switch for building models without loading weights); this
re-export keeps older imports working until every importer uses the new module."""

from t2i_train.models.loading import no_weight_loading, weight_loading_enabled

__all__ = ["no_weight_loading", "weight_loading_enabled"]
