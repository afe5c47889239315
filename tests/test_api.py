"""The notebook API: every advertised name imports, and `import lnsdiag` stays light."""

from __future__ import annotations

import subprocess
import sys

import lnsdiag


def test_every_export_resolves():
    for name in lnsdiag.__all__:
        assert getattr(lnsdiag, name) is not None, name


def test_import_is_light():
    code = "import sys, lnsdiag; print('lm_eval' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_library_modules_stand_alone():
    """Every module below the command line imports neither typer nor lnsdiag.cli, and nothing that
    computes imports lnsdiag.report (results are plain data handed upward)."""
    import pkgutil

    names = [m.name for m in pkgutil.walk_packages(lnsdiag.__path__, "lnsdiag.")
             if not m.name.startswith(("lnsdiag.cli", "lnsdiag.report")) and not m.name.endswith("__main__")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in ('typer', 'lnsdiag.cli', 'lnsdiag.report') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(names) > 20 and out.strip() == "[]"
