"""Benchmarks of amapo-fast's loss layer against the eager reference and the fused peers (`python bench/run.py`)."""
