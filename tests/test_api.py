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
