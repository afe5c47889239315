"""Loading a checkpoint and knowing its structure: the block stack, the text config, sub-layers."""
