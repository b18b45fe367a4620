"""Benchmarks of nrfx against its peers (run as modules: python -m benchmarks.bench_analysis)."""
