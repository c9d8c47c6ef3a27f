"""The Accelerate training loop, its hooks, checkpoints and the training-time mitigations."""
