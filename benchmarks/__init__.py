"""The benchmark suite: `python -m benchmarks.<name>` from the repository root (docs/benchmarks.md)."""
