"""Training engine: the per-worker loop, schedules and checkpoints."""
