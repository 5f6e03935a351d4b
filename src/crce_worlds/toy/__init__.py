"""The toy shapes world: a CPU-sized copy of the study whose numbers mean something."""
