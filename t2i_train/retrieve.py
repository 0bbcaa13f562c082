"""`python -m t2i_train.retrieve`: see t2i_train/cli/retrieve.py."""

from t2i_train.cli.retrieve import main

if __name__ == "__main__":
    main()
