"""Input files: discovery, line and columnar readers, and the deterministic unit plan."""
