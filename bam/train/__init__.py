"""Training one model: settings, parameter groups and optimizer, schedule, processes (DDP/FSDP),
resumable training state, metrics and the loop."""
