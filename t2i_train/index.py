"""`python -m t2i_train.index`: see t2i_train/cli/index.py."""

from t2i_train.cli.index import main

if __name__ == "__main__":
    main()
