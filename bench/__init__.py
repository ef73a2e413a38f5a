"""Benchmark harness for the sign-in flow: `python -m bench` (see bench/README.md)."""
