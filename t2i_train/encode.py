"""`python -m t2i_train.encode`: see t2i_train/cli/encode.py."""

from t2i_train.cli.encode import main

if __name__ == "__main__":
    main()
