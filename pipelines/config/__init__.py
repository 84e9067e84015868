"""pipeline.config: the user-facing configuration, read and rewritten as text."""
