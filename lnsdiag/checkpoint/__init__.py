"""Models really built without units, saved checkpoints and their model cards."""
