"""``python -m t2i_train.shards``: see :mod:`t2i_train.cli.shards`."""

from t2i_train.cli.shards import main

if __name__ == "__main__":
    raise SystemExit(main())
