"""Batch systems: job scripts (script.py), the in-job runner (runner.py), elastic Slurm nodes (elastic.py)."""
