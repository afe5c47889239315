"""The embedded demo: its model recipe, shipped weights, training and run."""
