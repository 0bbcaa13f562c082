"""`python -m t2i_train.pipeline`: see t2i_train/cli/pipeline.py."""

from t2i_train.cli.pipeline import main

if __name__ == "__main__":
    main()
