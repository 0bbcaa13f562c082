"""`python -m t2i_train.recaption`: see t2i_train/cli/recaption.py."""

from t2i_train.cli.recaption import main

if __name__ == "__main__":
    main()
