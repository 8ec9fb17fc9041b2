"""From scans to network input and back: the settings, geometry, normalisation,
resampling, one case, the cache and whole datasets (no torch)."""
