"""Hostile inputs: what a careless user does (wrong option, odd file, two runs at once, kill -9),
and what lnsdiag must do then — refuse with one line and exit 2 before any output, or recompute,
but never mix results or leave a mess. Each case is one a real user hit; new ones belong here:

* ``test_results`` — results that cannot mix (task data edited in place, umask, killed saves);
* ``test_task_inputs`` — local lm-eval tasks with bad documents, labels, few-shot splits;
* ``test_options`` — option values, repeats, conflicts, late refusals, damaged files;
* ``test_texts`` — perplexity texts too short to score.
"""
