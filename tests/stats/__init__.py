"""lnsdiag.stats against brute force, hand computations and independent re-derivations.

One test module per module of the package. Nothing here reuses the package's own helpers to
compute an expected value: SEs come from explicit sums, bootstrap draws from plain loops over
numpy's generator, Tango's restricted MLE from a direct numerical maximisation of the
constrained likelihood, t quantiles from tables (and scipy when it happens to be installed).
"""
