"""Training: the one loop for both stages, parameter groups, the VL feature cache, checkpoints, resume, DDP / FSDP2."""
