"""Loading a checkpoint and knowing its structure: the block stack, the text config, sub-layers,
how a block normalises; the one table of family knowledge (``families``); the one way to patch a
model and restore it (``patch``), and the one way to watch a block run (``watch``)."""
