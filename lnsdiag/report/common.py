"""Shared pieces of every report: bars, one plot style (PNG + PDF), LaTeX tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

BAR_WIDTH = 24


def bar(value: float, top: float, width: int = BAR_WIDTH) -> str:
    """A unicode bar of ``value`` on a scale up to ``top`` (eighth-block resolution)."""
    if top <= 0 or value != value:  # NaN
        return ""
    eighths = max(0, min(width * 8, round(value / top * width * 8)))
    full, rest = divmod(eighths, 8)
    return "█" * full + ("▏▎▍▌▋▊▉"[rest - 1] if rest else "")


# --- plotting ------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 150, "savefig.dpi": 200, "font.size": 9, "axes.grid": True,
        "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "savefig.bbox": "tight", "pdf.fonttype": 42,
    })
    return plt


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (atomically enough: rendered then renamed)."""
    plt = pyplot()
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix("." + ext)
        tmp = path.with_name(f".{path.name}.tmp.{ext}")
        fig.savefig(tmp, format=ext)
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths


def files_table(files: list[Path]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1))
    for f in files:
        table.add_row("[dim]wrote[/dim]", str(f))
    return table


class LatexRaw(str):
    """A table cell that is already LaTeX (not escaped); keep frames holding it ``dtype=object``."""


_LATEX_SPECIAL = (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                  ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("Δ", r"$\Delta$"), ("±", r"$\pm$"),
                  ("×", r"$\times$"), ("≤", r"$\le$"), ("→", r"$\to$"))


def latex_escape(value: Any) -> str:
    if isinstance(value, LatexRaw):
        return str(value)
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    out = []
    for ch in text:
        for plain, latex in _LATEX_SPECIAL:
            if ch == plain:
                out.append(latex)
                break
        else:
            out.append(ch)
    return "".join(out)


def frame_to_latex(frame: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs table a paper can ``\\input``. ``caption`` is raw LaTeX; cells are escaped
    unless they are :class:`LatexRaw`."""
    cols = list(frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(rf"\caption{{{caption}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [r"\begin{tabular}{" + "r" * len(cols) + "}", r"\toprule",
              " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for row in frame.itertuples(index=False):
        cells = ["" if v is None or (isinstance(v, float) and v != v) else latex_escape(v) for v in row]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)
