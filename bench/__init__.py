"""Benchmarks: scripts that print a table; results in bench/RESULTS.md."""
