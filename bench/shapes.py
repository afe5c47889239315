"""Token-level request sets shaped like the workloads people sweep, for the benchmark and the
counted-work tests: what lm-eval hands the engine, with random token ids (the work does not
depend on which tokens they are).

* ``mmlu``: k-shot multiple choice with a fixed few-shot set per subject (lm-eval's MMLU:
  a subject description and the first 5 dev examples, then the question and ``Answer:``),
  4 one-token answers; ≈ 80% of each 400–700-token prompt is shared within its subject.
* ``hellaswag``: k-shot with few-shot examples drawn per document (lm-eval's default sampler),
  a ≈ 100-token context and 4 endings of 10–30 tokens.
* ``rolling``: lm-eval's rolling perplexity windows of documents (``loglikelihood_rolling``).
"""

from __future__ import annotations

import random

from lnsdiag.scoring.base import TokenRequest

BOS = 1


def _tokens(rng: random.Random, low: int, high: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(low, high)))


def mmlu(subjects: int = 20, questions: int = 40, shots: int = 5, *, vocab: int = 32000, seed: int = 0,
         description: tuple[int, int] = (30, 50), shot: tuple[int, int] = (55, 85),
         question: tuple[int, int] = (50, 150), answers: int = 4) -> list[TokenRequest]:
    """MMLU-shaped requests: per subject a description and ``shots`` fixed examples shared by
    every question; each question's ``answers`` one-token choices share its context."""
    rng = random.Random(seed)
    answer_ids = tuple(range(3, 3 + answers))
    cue = _tokens(rng, 2, 2, vocab)  # "Answer:"
    out = []
    for _ in range(subjects):
        prefix = (BOS, *_tokens(rng, *description, vocab))
        for _ in range(shots):
            prefix += _tokens(rng, *shot, vocab) + cue + (rng.choice(answer_ids),)
        for _ in range(questions):
            context = prefix + _tokens(rng, *question, vocab) + cue
            out += [TokenRequest(context, (a,)) for a in answer_ids]
    return out


def hellaswag(documents: int = 200, shots: int = 10, *, vocab: int = 32000, seed: int = 0, pool: int = 10_000,
              context: tuple[int, int] = (80, 120), ending: tuple[int, int] = (10, 30),
              endings: int = 4) -> list[TokenRequest]:
    """HellaSwag-shaped requests: ``shots`` examples (a context and its gold ending) drawn per
    document from a large training pool, then the document's context; 4 multi-token endings."""
    rng = random.Random(seed)
    cache: dict[int, tuple[int, ...]] = {}

    def example(i: int) -> tuple[int, ...]:
        if i not in cache:
            own = random.Random(seed * 1_000_003 + i)
            cache[i] = _tokens(own, *context, vocab) + _tokens(own, *ending, vocab)
        return cache[i]

    out = []
    for _ in range(documents):
        ctx: tuple[int, ...] = (BOS,)
        for i in rng.sample(range(pool), shots):
            ctx += example(i)
        ctx += _tokens(rng, *context, vocab)
        out += [TokenRequest(ctx, _tokens(rng, *ending, vocab)) for _ in range(endings)]
    return out


def rolling(documents: int = 8, doc_tokens: tuple[int, int] = (2000, 6000), max_length: int = 4096, *,
            vocab: int = 32000, seed: int = 0) -> list[TokenRequest]:
    """Rolling perplexity windows, cut by lm-eval's own functions (disjoint windows of
    ``max_length`` predicted tokens, the first after a BOS, each later one after one token)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(seed)
    out = []
    for _ in range(documents):
        tokens = list(_tokens(rng, *doc_tokens, vocab))
        for window in get_rolling_token_windows(tokens, prefix_token=BOS, max_seq_len=max_length, context_len=1):
            ctx, cont = make_disjoint_window(window)
            out.append(TokenRequest(tuple(ctx), tuple(cont)))
    return out
