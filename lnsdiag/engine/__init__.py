"""Sweeps over many variants: the fast one-pass engine and the naive reference.

A variant is a :class:`~lnsdiag.interventions.units.Removal` (the empty one: the full model).

* ``plan`` — the row plan: requests into model rows, prefix-shared over a trie (``plan_rows``);
* ``budget`` — how much at once: batches, the memory budget, row width, attention windows;
* ``work`` — the work a pass does, counted in block-token passes (fast and naive);
* ``checkpoint`` — the partial-pass file an interrupted pass resumes from;
* ``fast`` — ``SweepEngine``: every variant's log-likelihoods from one pass;
* ``naive`` — ``run_naive``: one full evaluation per variant (the reference);
* ``sweep`` — ``run_fast`` (the fast engine over scorers) and ``perplexity_sweep``;
* ``outcome`` — what either sweep hands back (``SweepOutcome``), each variant stored when done.
"""
