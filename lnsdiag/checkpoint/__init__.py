"""A model without some blocks, for real: the reference every removal is tested against, and the
pruned model written as a checkpoint that plain ``from_pretrained`` loads.

* :mod:`.reference` — :func:`~.reference.build_without_layers`: a fresh model of the same class
  built from a config that really has fewer layers (each kept layer keeping its role), with the
  kept weights copied in; the independent answer hooked removal must match.
* :mod:`.save` — :func:`~.save.save_without_layers`: the same reduced config and the kept
  weights streamed into safetensors shards (tied weights, dtype, atomic staging folder);
  :class:`~.save.SavedCheckpoint` says what was written.
  LayerNorm Scaling is written folded into the norm weights (any runtime computes it).
* :mod:`.sublayers` — a removal's attention and MLP sub-layers of kept blocks, written as zeroed output
  projections (:func:`~.sublayers.zeroed_names`) and recorded in the config, which lnsdiag's loader skips.
* :mod:`.export` — :func:`~.export.export_checkpoint`: a whole model written by the same writer, so
  that plain transformers, vLLM and lm-eval compute it exactly (``lnsdiag export``).
* :mod:`.card` — what a checkpoint says about itself: the ``README.md`` model card and the
  ``lnsdiag_pruned.json`` / ``lnsdiag_export.json`` provenance record (:func:`~.card.read_provenance`,
  :func:`~.card.provenance_line` for ``lnsdiag inspect``).

``reference`` depends on nothing here; ``sublayers`` on ``reference``; ``save`` uses all three others;
``export`` uses ``save`` and ``card``; ``card`` is plain text and JSON.
"""
