"""The one way lnsdiag changes a loaded model: patches installed on a handle, restored from it.

Every intervention — removing a block, resuming the fast engine from a kept state, LayerNorm
Scaling, Post-LN, the measuring probes — installs what it needs through a :class:`Patches`
handle: a forward override on one module instance, or a forward (pre-)hook. The handle knows
exactly what it installed, so restoring it never scans torch's private hook dictionaries and
never touches what someone else installed. Used as a context manager it restores on any exit,
exceptions included; kept (``LNS`` on a loaded model), it restores when asked.

    with patched() as patches:
        patches.hook(model.lm_head, record)
        model(ids)
    # model exactly as before
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

#: Marks a forward this module installed, so nested or stale overrides can be recognised.
PATCHED_ATTR = "__lnsdiag_patched__"


class Patches:
    """What one intervention installed on a model, restorable in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def forward(self, module: nn.Module, forward: Callable[..., Any], *, tag: str = "patched") -> None:
        """Replace ``module.forward`` on this instance (not its class) until restored."""
        had_own, previous = "forward" in module.__dict__, module.__dict__.get("forward")

        def installed(*args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs)

        setattr(installed, PATCHED_ATTR, tag)
        module.forward = installed

        def undo() -> None:
            if had_own:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)

        self._undo.append(undo)

    def pre_hook(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """A forward pre-hook on ``module`` (``hook(module, args[, kwargs])``) until restored."""
        self._undo.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs).remove)

    def hook(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """A forward hook on ``module`` (``hook(module, args, output)``) until restored."""
        self._undo.append(module.register_forward_hook(hook).remove)

    def restore(self) -> None:
        """Undo everything installed, last first; the handle is empty (and reusable) afterwards."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@contextmanager
def patched() -> Iterator[Patches]:
    """A fresh :class:`Patches` handle restored when the ``with`` block ends, however it ends."""
    patches = Patches()
    try:
        yield patches
    finally:
        patches.restore()


def patched_forward(module: nn.Module) -> str | None:
    """The tag of a forward installed on this module by :class:`Patches` (``None``: its own)."""
    return getattr(module.__dict__.get("forward"), PATCHED_ATTR, None)
