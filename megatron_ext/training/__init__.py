"""The trainer: configuration, distributed setup, loop, loss, checkpoints, logging."""
