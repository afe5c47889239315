"""Sweeps over many variants: the fast one-pass engine and the naive reference."""
