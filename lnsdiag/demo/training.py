"""A small, deterministic causal-LM training loop (the demo models and Pre-LN/LNS twins).

Any HF causal LM trains here; so do they with Trainer or accelerate, this is just the
shortest loop that makes two runs differ only in what the caller changed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.structure import no_cache_kwargs
from ..progress import SILENT, Progress


@dataclass
class TrainLog:
    """What happened during training, for the JSON record."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 20):]
        return sum(tail) / len(tail)

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "final_train_loss": round(self.final_loss, 4), "eval_loss": self.eval_loss,
                "loss_every_10_steps": [round(x, 4) for x in self.losses[::10]]}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, prefix: list[int],
                 generator: torch.Generator) -> torch.Tensor:
    """Random windows of the token stream, each starting with the tokenizer's prefix (BOS)."""
    body = seq_len - len(prefix)
    starts = torch.randint(0, len(stream) - body, (batch_size,), generator=generator)
    rows = [torch.cat([torch.tensor(prefix, dtype=torch.long), stream[s:s + body]]) for s in starts.tolist()]
    return torch.stack(rows)


def train_causal_lm(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float = 3e-3,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    seed: int = 0,
    prefix: list[int] | None = None,
    progress: Progress = SILENT,
) -> TrainLog:
    """Train ``model`` in place with AdamW on random windows of ``stream``.

    Same seed, same stream, same model shape: same batches in the same order, so two
    models that differ only in their norms see exactly the same data. Each step advances
    ``progress``'s current phase by one, with the step's loss as detail (the caller names
    the phase: it knows what is being trained).
    """
    prefix = prefix or []
    device = next(model.parameters()).device
    warmup = warmup if warmup is not None else max(1, steps // 10)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    log = TrainLog(steps=steps, tokens=steps * batch_size * seq_len, seconds=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        ids = sample_batch(stream, batch_size, seq_len, prefix, generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=ids, labels=ids, **no_cache_kwargs(model)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        value = float(loss.detach())
        log.losses.append(value)
        progress.advance(1, detail=f"loss {value:.2f}")
    model.eval()
    log.seconds = time.perf_counter() - start
    return log
