"""`python -m t2i_train.export`: see t2i_train/cli/export.py."""

from t2i_train.cli.export import main

if __name__ == "__main__":
    main()
