"""lm-evaluation-harness tasks as a scorer: lm-eval's own numbers for every model variant,
without rebuilding its prompts per variant.

One module per step, in the order a run uses them:

- :mod:`.tasks` finds, loads and configures the tasks once (:func:`~.tasks.load_tasks` names a
  broken task YAML instead of calling its task unknown; :class:`~.tasks.TaskSet`), parses
  ``--limit`` / ``--num-fewshot``, and runs lm-eval's ``evaluate`` on them
  (:func:`~.tasks.evaluate_tasks`).
- :mod:`.lm` is the model as lm-eval sees it: :class:`~.lm.LnsdiagHFLM` (HFLM without a KV cache,
  able to record lm-eval's token requests instead of scoring them), built by
  :func:`~.lm.make_lm`, and :class:`~.lm.ReplayLM` (stored answers handed back to ``evaluate``).
  It imports lm-eval, torch and transformers, so nothing imports it until a model is wrapped.
- :mod:`.requests` collects every token request once (:func:`~.requests.collect_requests`) and
  keeps lm-eval's task instances (:class:`~.requests.BuiltRequests`) to turn each variant's
  answers into lm-eval's results dict with the tasks' own filters and ``process_results``.
- :mod:`.aggregate` applies lm-eval's aggregations and stderrs to per-document items, names
  them by lm-eval's registry, and turns results dicts into tidy rows (:func:`~.aggregate.scores_of`).
- :mod:`.fingerprint` digests what the tasks really are (configs after includes, request texts,
  gold targets: :func:`~.fingerprint.task_data_digest`), so a task edited in place is never
  resumed into a folder made with its old data.
- :mod:`.scorer` puts these together as :class:`~.scorer.LmEvalScorer`, the
  :class:`~lnsdiag.scoring.base.Scorer` both sweep engines call.

Importing this package imports nothing: each name lives in the module above that defines it.
"""
