"""Measurements of the residual stream: angular distances, variance."""
