"""The package stays pure (numpy and the standard library) and keeps its flat API."""

from __future__ import annotations

import subprocess
import sys

from lnsdiag import stats


def test_import_loads_no_heavy_dependency_and_no_other_lnsdiag_module():
    code = ("import sys, lnsdiag.stats\n"
            "print(sorted(m for m in ('torch', 'pandas', 'scipy') if m in sys.modules))\n"
            "print(sorted(m for m in sys.modules if m.startswith('lnsdiag.') and not m.startswith('lnsdiag.stats')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "[]"]


def test_every_public_name_resolves_on_the_package():
    for name in stats.__all__:
        assert getattr(stats, name) is not None, name
    assert stats.paired_mean.__module__ == "lnsdiag.stats.means"
