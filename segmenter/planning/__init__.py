"""What to train: dataset fingerprint, U-Net topology, the dataset plan of
``segmenter plan`` and a trained run's plan (no torch)."""
