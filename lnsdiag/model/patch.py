"""The one way lnsdiag changes a loaded model: patches installed on a handle, restored from it.

Every intervention — removing a block, resuming the fast engine from a kept state, LayerNorm
Scaling, Post-LN, the measuring probes, a heal folded into a weight — installs what it needs
through a :class:`Patches` handle: a forward override on one module instance, a forward
(pre-)hook, or another tensor held by a parameter (its own tensor object put back on restore). The handle knows
exactly what it installed, so restoring it never scans torch's private hook dictionaries and
never touches what someone else installed. Used as a context manager it restores on any exit,
exceptions included::

    with patched() as patches:
        patches.hook(model.lm_head, record)
        model(ids)
    # model exactly as before

Kept instead (LayerNorm Scaling and Post-LN on a loaded model), a handle lives on a module
(:meth:`Patches.keep_on`) and is restored when asked (:func:`release`). What a handle holds is
plain data (modules, hook handles, callable objects rather than closures), so a deep copy of the
model copies its kept handles along and each copy restores its own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: Prefix of the attribute a kept handle lives under on its owner module.
_KEPT_PREFIX = "_lnsdiag_patches_"
#: Tensors installed on parameters, newest last: id(parameter) -> [(its tensor before, installed, tag)]
#: (by id: a tensor compares element by element; an entry lives only while its handle holds the parameter).
_TENSORS: dict[int, list[tuple[torch.Tensor, torch.Tensor, str]]] = {}


class _Override:
    """A forward installed on a module instance: calls ``forward``; ``tag`` says who installed it;
    ``previous`` is the instance's own forward it covers (an accelerate wrapper...), or None."""

    def __init__(self, forward: Callable[..., Any], tag: str, previous: Any = None) -> None:
        self.forward = forward
        self.tag = tag
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


class _RestoreForward:
    """Undo of one override: the module's own earlier forward back, or none (its class's)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.had_own = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")

    def __call__(self) -> None:
        if self.had_own:
            self.module.forward = self.previous
        else:
            self.module.__dict__.pop("forward", None)


class _RestoreTensor:
    """Undo of one installed tensor: the parameter's earlier tensor back, the record dropped."""

    def __init__(self, param: nn.Parameter, own: torch.Tensor) -> None:
        self.param, self.own = param, own

    def __call__(self) -> None:
        self.param.data = self.own
        held = _TENSORS.get(id(self.param), [])
        if held:
            held.pop()
        if not held:
            _TENSORS.pop(id(self.param), None)


class Patches:
    """What one intervention installed on a model, restorable in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def forward(self, module: nn.Module, forward: Callable[..., Any], *, tag: str = "patched") -> None:
        """Replace ``module.forward`` on this instance (not its class) until restored."""
        undo = _RestoreForward(module)
        module.forward = _Override(forward, tag, module.__dict__.get("forward"))
        self._undo.append(undo)

    def pre_hook(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """A forward pre-hook on ``module`` (``hook(module, args[, kwargs])``) until restored."""
        self._undo.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs).remove)

    def hook(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """A forward hook on ``module`` (``hook(module, args, output)``) until restored."""
        self._undo.append(module.register_forward_hook(hook).remove)

    def tensor(self, param: nn.Parameter, new: torch.Tensor, *, tag: str = "patched") -> None:
        """``param`` holds ``new`` until restored; then its own tensor object again (bit for bit)."""
        own = param.data
        param.data = new
        _TENSORS.setdefault(id(param), []).append((own, new, tag))
        self._undo.append(_RestoreTensor(param, own))

    def restore(self) -> None:
        """Undo everything installed, last first; the handle is empty (and reusable) afterwards."""
        while self._undo:
            self._undo.pop()()

    def keep_on(self, owner: nn.Module, name: str) -> Patches:
        """Keep this handle on ``owner`` under ``name`` (see :func:`kept`, :func:`release`); returns it."""
        if kept(owner, name) is not None:
            raise RuntimeError(f"{type(owner).__name__} already keeps {name!r} patches: release them first")
        setattr(owner, _KEPT_PREFIX + name, self)
        return self

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
    forward = module.__dict__.get("forward")
    return forward.tag if isinstance(forward, _Override) else None


@contextmanager
def overrides_lifted(modules: list[nn.Module], tags: tuple[str, ...]) -> Iterator[None]:
    """Each module's forward as it was before an override tagged one of ``tags`` (its own, or the
    instance forward the override covers) for the duration; the overrides are back afterwards."""
    held = [(m, m.__dict__["forward"]) for m in modules if patched_forward(m) in tags]
    for module, override in held:
        if override.previous is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = override.previous
    try:
        yield
    finally:
        for module, override in held:
            module.__dict__["forward"] = override


@contextmanager
def tensors_lifted(model: nn.Module, tags: tuple[str, ...]) -> Iterator[None]:
    """Each parameter of ``model`` holding a tensor installed with one of ``tags`` (the newest) holds
    the one it had before for the duration; the installed tensors are back afterwards."""
    held = [(p, stack[-1]) for p in model.parameters() if (stack := _TENSORS.get(id(p))) and stack[-1][2] in tags]
    for param, (own, _, _) in held:
        param.data = own
    try:
        yield
    finally:
        for param, (_, installed, _) in held:
            param.data = installed


def kept(owner: nn.Module, name: str) -> Patches | None:
    """The handle kept on ``owner`` under ``name`` by :meth:`Patches.keep_on`, if any."""
    return owner.__dict__.get(_KEPT_PREFIX + name)


def release(owner: nn.Module, name: str) -> bool:
    """Restore the handle kept on ``owner`` under ``name`` and forget it; True if there was one."""
    patches = kept(owner, name)
    if patches is None:
        return False
    patches.restore()
    del owner.__dict__[_KEPT_PREFIX + name]
    return True
