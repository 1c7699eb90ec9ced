"""Benchmark harness for dispatcher: see bench/README.md."""
