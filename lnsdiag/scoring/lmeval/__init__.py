"""lm-evaluation-harness tasks as a scorer."""
