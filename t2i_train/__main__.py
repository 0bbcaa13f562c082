"""`python -m t2i_train [overrides]` trains; see README.md."""

from t2i_train.cli.train import main

if __name__ == "__main__":
    main()
