"""Helpers the tests share (NumPy references, tiny model files, checkpoint comparisons); not tests."""
