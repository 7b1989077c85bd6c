"""Prefect wrappers around the stages in `nash.iteration`: tasks pass file paths, never data."""
