"""Sliding window with mirroring, the predictor loaded from a run, ``segmenter predict``."""
