"""Throughput and quality harnesses (run from a source checkout: ``python -m benchmarks.<name>``)."""
