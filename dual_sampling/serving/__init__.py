"""Starting vLLM servers from Python (tests, benchmarks, self-serving jobs)."""
