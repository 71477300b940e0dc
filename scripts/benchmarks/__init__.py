"""Benchmarks behind scripts/bench; each writes a table to docs/benchmarks.md."""
