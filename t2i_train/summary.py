"""`python -m t2i_train.summary`: see t2i_train/cli/summary.py."""

from t2i_train.cli.summary import main

if __name__ == "__main__":
    main()
