"""Dataset layout, verification, cross-validation splits, synthetic phantoms (no torch)."""
