"""`python -m t2i_train.evaluate`: see t2i_train/cli/evaluate.py."""

from t2i_train.cli.evaluate import main

if __name__ == "__main__":
    main()
