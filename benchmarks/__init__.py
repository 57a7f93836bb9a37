"""Speed and memory benchmarks of extraction; see benchmarks/README.md."""
