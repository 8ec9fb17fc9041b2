"""Scoring masks: connected components, lesion matching, metrics, post-processing,
reports, ``segmenter evaluate`` and threshold tuning (numpy only, no torch)."""
