"""`python -m examples.seq2seq`: train, evaluate and save the dates encoder-decoder (see `train.py`)."""

from examples.seq2seq.train import main

if __name__ == "__main__":
    main()
