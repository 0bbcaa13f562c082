"""`python -m t2i_train.caption_accuracy`: see t2i_train/cli/caption_accuracy.py."""

from t2i_train.cli.caption_accuracy import main

if __name__ == "__main__":
    main()
