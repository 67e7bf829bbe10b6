"""Live migration: the source and target sides, their convergence policy and their statistics."""
