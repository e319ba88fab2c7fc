"""Per-family knowledge: which architectures kiln knows and how their checkpoints load."""
