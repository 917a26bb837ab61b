"""Benchmark scripts for smd: run them with `python -m benchmarks.<name>` from the repository root."""
