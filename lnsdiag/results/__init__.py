"""Resumable result stores, paired deltas and verdicts."""
