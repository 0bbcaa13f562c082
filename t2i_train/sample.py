"""`python -m t2i_train.sample`: see t2i_train/cli/sample.py."""

from t2i_train.cli.sample import main

if __name__ == "__main__":
    main()
