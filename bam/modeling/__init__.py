"""The model and what is known from its config alone: BamConfig, the parameter layout, attention,
the MoE FFN, the losses, costs and presets. Reads no files."""
