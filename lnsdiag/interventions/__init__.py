"""Reversible changes to a loaded model: removing units, LayerNorm Scaling, Post-LN."""
