"""Patch sampling, augmentation, the schedule, the state ``--resume`` restores,
validation and the training loop."""
