"""The package's architecture, enforced: every lnsdiag import (module-level or inside a function)
goes down the data flow, never up or sideways, and function-local imports of lnsdiag modules
exist only where a module is kept lazy for a heavy dependency.

Read statically (the AST), so an import a test never executes is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lnsdiag

ROOT = Path(lnsdiag.__file__).parent

#: The layers, lowest first. A module may import from its own layer's subpackage and from lower
#: layers. Each entry is a module or subpackage prefix (relative to ``lnsdiag``).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "progress", "stats"),  # foundation: no lnsdiag imports beyond this layer
    ("runs", "distributed"),
    ("model.families", "model.patch", "model.structure", "model.watch", "model.placement"),
    ("interventions",),
    ("model.load", "model"),  # loading restores LNS / Post-LN recorded in a checkpoint
    ("data",),
    ("checkpoint", "measure", "scoring"),
    ("heal",),  # a linear heal of a pruned model: builds on checkpoint's reference and writer
    ("results",),
    ("engine",),
    ("demo",),
    ("runners",),
    ("report",),
    ("cli",),
    ("__main__", "demo.__main__"),  # entry points
]

#: Function-local lnsdiag imports that stay lazy on purpose: (importing module, imported module).
LAZY_ALLOWED = {
    # lm-eval's HFLM subclass imports lm_eval, transformers and torch at import time
    ("scoring.lmeval.scorer", "scoring.lmeval.lm"),
    # lm-eval's model type "lnsdiag" (registered on import): `lnsdiag lm-eval` imports it when it runs
    ("cli.lm_eval", "scoring.lmeval.model_type"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _target(current: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The lnsdiag module an import names, relative to ``lnsdiag`` ('' for the package itself)."""
    if node.level == 0:
        module = node.module or ""
        if module != "lnsdiag" and not module.startswith("lnsdiag."):
            return None
        return module.removeprefix("lnsdiag").lstrip(".")
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = [p for p in base if p]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importing module, imported module, line, inside a function) for every lnsdiag import."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        current = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _target(current, path.name == "__init__.py", node)
            if target is None:
                continue
            # ``from . import x`` imports submodule x when there is one
            names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            modules = [n for n in names if _exists(n)] or [target]
            found += [(current, m, node.lineno, id(node) in inner) for m in modules]
    return found


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(module: str) -> tuple[int, str]:
    """The layer index of a module, and the prefix that placed it (longest match)."""
    best = (-1, "")
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (index, prefix)
    return best


def test_every_module_has_a_layer():
    unplaced = sorted({m for m, _, _, _ in _imports() if m and _layer(m)[0] < 0})
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_imports_go_down_the_data_flow():
    wrong = []
    for module, target, line, _local in _imports():
        if not module or not target or target == "__version__":
            continue
        (mine, my_prefix), (theirs, their_prefix) = _layer(module), _layer(target)
        same_part = my_prefix.split(".")[0] == their_prefix.split(".")[0]
        if theirs > mine or (theirs == mine and not same_part):
            wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_function_local_imports_but_lazy_heavy_ones():
    local = [f"{module}:{line} imports {target}" for module, target, line, inside in _imports()
             if inside and (module, target) not in LAZY_ALLOWED]
    assert not local, "function-local lnsdiag imports (move them to the top):\n" + "\n".join(local)
