"""locotrain: train language models across unequal hardware joined by slow networks."""

__version__ = "0.1.0"
