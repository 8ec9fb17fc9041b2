"""The network, the losses, checkpoints and the device/precision runtime (torch starts here)."""
