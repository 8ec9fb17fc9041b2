"""Cross-validation, comparisons of config variants and the demo: training, inference
and evaluation composed."""
