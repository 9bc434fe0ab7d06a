"""Benchmarks, run from the repository root as modules: `python -m benchmarks.<name>` (see
benchmarks/README.md). Results: benchmarks/results/<machine>/, one current file per benchmark."""
