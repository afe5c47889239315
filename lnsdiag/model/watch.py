"""Watch one block run: its input, its output, and the first input and output of chosen modules.

Knowing where a block normalises (pre-LN, post-LN, sandwich) and which norms LayerNorm Scaling
may scale is read off one real forward pass, not off class names: this is that pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .patch import patched
from .structure import block_input, first_tensor, probe


@dataclass
class BlockRun:
    """What one block saw and produced in a probe pass; per watched module, in call order."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def watch_block(model: nn.Module, block: nn.Module, modules: Mapping[str, nn.Module]) -> BlockRun:
    """Run :func:`~lnsdiag.model.structure.probe` once and record ``block`` and ``modules``.

    Only the first call of each is kept: a block runs once per pass, and so do its norms and
    sub-layers in every family tested (``tests/test_surgery.py``). Exceptions of the model's
    forward propagate; the model is restored either way.
    """
    run = BlockRun()

    def block_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if run.input is None:
            run.input = block_input(args, kwargs)

    def block_out(_m: nn.Module, _a: tuple, out: Any) -> None:
        if run.output is None:
            run.output = first_tensor(out)

    def module_io(name: str):
        def hook(_m: nn.Module, args: tuple, out: Any) -> None:
            if args and torch.is_tensor(args[0]):
                run.inputs.setdefault(name, args[0].detach())
            tensor = first_tensor(out)
            if tensor is not None:
                run.outputs.setdefault(name, tensor.detach())
        return hook

    with patched() as patches:
        patches.pre_hook(block, block_in, with_kwargs=True)
        patches.hook(block, block_out)
        for name, module in modules.items():
            patches.hook(module, module_io(name))
        probe(model)
    return run
