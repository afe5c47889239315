"""The model as lm-eval sees it: :class:`LnsdiagHFLM` (lm-eval's HFLM around the loaded model,
which can record lm-eval's requests instead of scoring them) and :class:`ReplayLM` (stored
answers handed back to lm-eval, to aggregate a variant through lm-eval's own ``evaluate``).

Importing this module imports lm-eval, torch and transformers (seconds): the light modules of
this package never import it at their top, so ``import lnsdiag`` stays cheap.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM

from ...model.structure import no_cache_kwargs
from ..base import TokenRequest
from .requests import RequestLog, request_key
from .tasks import DEFAULT_BOOTSTRAP, TaskSet, evaluate_tasks, quiet_lm_eval, seed_everything

if TYPE_CHECKING:
    from ...model.load import LoadedModel


class LnsdiagHFLM(HFLM):
    """HFLM whose scoring passes build no KV cache (removed layers then cost nothing), and
    which can record lm-eval's tokenised requests (its own encoding and windowing) instead
    of scoring them (:meth:`recording`)."""

    log: RequestLog | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[RequestLog]:
        self.log, self._pending = RequestLog(), []
        try:
            yield self.log
        finally:
            self.log = None

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return self.model(inps, **no_cache_kwargs(self.model)).logits

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        if self.log is not None:
            self._pending = requests  # HFLM encodes them, then calls _loglikelihood_tokens
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.log is not None)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: Any = None) -> list:
        if self.log is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        for instance, (_, context, continuation) in zip(self._pending, requests, strict=True):
            key = request_key(instance)
            self.log.single.append((key, TokenRequest(tuple(context), tuple(continuation))))
            self.log.args[key] = instance.args
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        if self.log is None:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        for instance in requests:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(instance.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            key = request_key(instance)
            self.log.rolling.append((key, [TokenRequest(tuple(c), tuple(t)) for c, t in windows]))
            self.log.args[key] = instance.args
        return [0.0] * len(requests)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        if self.log is not None:
            raise RuntimeError("generation tasks are scored by the naive engine")
        return super().generate_until(requests, disable_tqdm=disable_tqdm)


def make_lm(loaded: LoadedModel, batch_size: int | str = 8, max_length: int | None = None) -> LnsdiagHFLM:
    """Wrap the loaded model for lm-eval, once per run (not once per variant).

    Log-softmax runs in float32 whatever the model dtype (lm-eval's default would keep bf16
    and sum bf16 log-probs); a scoring pass builds no KV cache, so removed layers cost nothing.
    """
    quiet_lm_eval()
    with contextlib.redirect_stdout(io.StringIO()):
        return LnsdiagHFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                           max_length=max_length, softmax_dtype=torch.float32, logits_cache=True)


class ReplayLM(LM):
    """Hands stored per-request answers to lm-eval, which aggregates metrics and stderr."""

    def __init__(self, single: dict, rolling: dict) -> None:
        super().__init__()
        self.single, self.rolling = single, rolling

    @staticmethod
    def _answer(table: dict, request: Any) -> Any:
        answer, args = table[request_key(request)]
        if args != request.args:  # few-shot sampling or data differ from the collected run
            raise RuntimeError(f"replayed request {request_key(request)} does not match the scored one")
        return answer

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return [self._answer(self.single, r) for r in requests]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return [self._answer(self.rolling, r) for r in requests]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        raise RuntimeError("generation tasks are scored by the naive engine")


def replay_metrics(tasks: TaskSet, single: dict, rolling: dict, *, limit: int | float | None = None,
                   seed: int = 1234, bootstrap_iters: int = DEFAULT_BOOTSTRAP, log_samples: bool = False
                   ) -> dict[str, Any]:
    """lm-eval's results dict for stored per-request answers (:meth:`RequestLog.tables`), through
    lm-eval's own ``evaluate`` (no model runs, but every request is rebuilt: seconds per call).
    The reference the direct aggregation is checked against, and its fallback."""
    seed_everything(seed)
    return evaluate_tasks(ReplayLM(single, rolling), tasks, limit=limit, seed=seed,
                          bootstrap_iters=bootstrap_iters, log_samples=log_samples)
