"""Training: the Accelerate trainer, configs, checkpoints."""
