"""Benchmarks: `make bench` (python -m bench) prints side-by-side figures from one run."""
