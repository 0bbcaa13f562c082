"""t2i_train: one config-driven trainer for text-to-image model families."""

__version__ = "0.1.0"
