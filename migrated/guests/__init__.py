"""Guests migrated runs: the workload guest and its loader."""
