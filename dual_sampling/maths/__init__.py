"""The math on arrays: alpha rules, q*, merged top-k, diagnostics, scoring sums, a dataset's statistics (numpy; no I/O)."""
