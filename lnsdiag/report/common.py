"""Shared pieces of every report: bars, one plot style (PNG + PDF), LaTeX tables."""

from __future__ import annotations

import functools
import io
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import pandas as pd
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 24
P = ParamSpec("P")
R = TypeVar("R")


def bar(value: float, top: float, width: int = BAR_WIDTH) -> str:
    """A unicode bar of ``value`` on a scale up to ``top`` (eighth-block resolution)."""
    if top <= 0 or value != value:  # NaN
        return ""
    eighths = max(0, min(width * 8, round(value / top * width * 8)))
    full, rest = divmod(eighths, 8)
    return "█" * full + ("▏▎▍▌▋▊▉"[rest - 1] if rest else "")


# --- tables --------------------------------------------------------------------------------

#: The widest a table may be: a paper's terminal, a CI log, a pasted snippet.
TABLE_WIDTH = 100
_BLANK = ("", "–", "-")


@dataclass
class Col:
    """One column: a one-line header and its cells (rich markup)."""

    header: str
    cells: list[str]
    justify: Literal["left", "right", "center"] = "right"

    def __post_init__(self) -> None:
        if "\n" in self.header:
            raise ValueError(f"a header is one line: {self.header!r}")

    @property
    def blank(self) -> bool:
        return all(Text.from_markup(c).plain.strip() in _BLANK for c in self.cells)


@dataclass
class TableSpec:
    """A table before it meets a width: ``key`` columns are repeated in every part, ``groups`` of columns
    stay together (one task's value, Δ and verdict) and are split across parts when they do not fit."""

    title: str
    key: list[Col]
    groups: list[list[Col]]
    caption: str | None = None
    sections: frozenset[int] = frozenset()  # rows followed by a rule (the baseline)

    def render(self, width: int = TABLE_WIDTH) -> list[Table | Group]:
        """Tables no wider than ``width``, without blank columns, split between groups where needed."""
        key = [c for c in self.key if not c.blank]
        groups = [g for g in ([c for c in group if not c.blank] for group in self.groups) if g]
        parts: list[list[Col]] = []
        for group in groups:
            if parts and _natural_width(self._table(key + parts[-1] + group)) <= width:
                parts[-1] += group
            else:
                parts.append(list(group))
        parts = parts or [[]]
        return [self._titled(self._table(key + part), f" ({i} of {len(parts)})" if len(parts) > 1 else "",
                             last=i == len(parts))
                for i, part in enumerate(parts, 1)]

    def _table(self, cols: list[Col]) -> Table:
        table = Table(header_style="bold")
        for col in cols:
            table.add_column(col.header, justify=col.justify, no_wrap=True, overflow="ellipsis")
        rows = max((len(c.cells) for c in cols), default=0)
        for i in range(rows):
            table.add_row(*(c.cells[i] if i < len(c.cells) else "" for c in cols), end_section=i in self.sections)
        return table

    def _titled(self, table: Table, suffix: str, last: bool) -> Table | Group:
        """Title and caption (after the last part only) on the table when they fit its width; otherwise lines
        of their own (a table stretched to its title's width, or a title wrapped in a narrow table, read badly)."""
        title = self.title + suffix if self.title else ""
        caption = (self.caption or "") if last else ""
        width = _natural_width(table)
        fits = [Text.from_markup(text).cell_len <= width for text in (title, caption)]
        table.title, table.title_justify = (title if title and fits[0] else None), "left"
        table.caption, table.caption_justify = (caption if caption and fits[1] else None), "left"
        if (title and not fits[0]) or (caption and not fits[1]):
            above = [Text.from_markup(title, style="table.title")] if title and not fits[0] else []
            below = [Text.from_markup(caption, style="table.caption")] if caption and not fits[1] else []
            return Group(*above, table, *below)
        return table


def _natural_width(table: Table) -> int:
    console = Console(file=io.StringIO(), width=10_000)
    return Measurement.get(console, console.options, table).maximum


class Tables:
    """Several tables shown one after another, each split to the console's width (at most
    :data:`TABLE_WIDTH`) when it is printed, so wide comparisons never wrap into unreadable cells."""

    def __init__(self, *specs: TableSpec) -> None:
        self.specs = list(specs)

    def render(self, width: int = TABLE_WIDTH) -> list[Table | Group]:
        return [table for spec in self.specs for table in spec.render(width)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = min(options.max_width, TABLE_WIDTH)
        for i, table in enumerate(self.render(width)):
            if i:
                yield Text()
            yield from console.render(table, options.update(width=width))


# --- plotting ------------------------------------------------------------------------------

#: Figure widths of a two-column paper (inches): one column, and the full text width.
SINGLE_COLUMN = 3.3
DOUBLE_COLUMN = 6.8
#: Okabe & Ito's palette: distinguishable with every common colour-vision deficiency, and in grey.
PALETTE = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
           "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "grey": "#999999"}
CYCLE = [PALETTE[c] for c in ("blue", "vermillion", "green", "orange", "purple", "sky", "black", "yellow")]
#: The sub-layers' colours wherever they are drawn beside their blocks, and every unit kind's name in words.
SUBLAYER_COLOURS = {"attn": PALETTE["orange"], "mlp": PALETTE["purple"]}
UNIT_WORDS = {"block": "block", "attn": "attention", "mlp": "MLP"}
#: Every plot is drawn under this style, so sizes and fonts match across figures; ``pdf.fonttype`` 42 embeds
#: TrueType fonts (journals reject Type 3), ``constrained`` layout and a tight bbox keep labels inside.
STYLE: dict[str, Any] = {
    "figure.dpi": 150, "savefig.dpi": 200, "savefig.bbox": "tight", "savefig.pad_inches": 0.03,
    "figure.constrained_layout.use": True, "pdf.fonttype": 42, "ps.fonttype": 42,
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "mathtext.fontset": "dejavusans",
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 9, "legend.frameon": False, "legend.handlelength": 1.6,
    "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.5, "axes.spines.top": False,
    "axes.spines.right": False, "axes.linewidth": 0.6, "axes.titlelocation": "left",
    "lines.linewidth": 1.2, "lines.markersize": 3.5, "errorbar.capsize": 1.5, "image.cmap": "viridis",
    "axes.prop_cycle": f"cycler('color', {CYCLE!r})",
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no window), with :data:`STYLE` applied globally;
    the report's own plots use :func:`figure`, which leaves the caller's settings alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def styled(plot: Callable[P, R]) -> Callable[P, R]:
    """Draw (and save) under :data:`STYLE` without changing the caller's rcParams (a notebook's)."""
    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes (always a 2-D array), not registered with pyplot (nothing to close, no backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def width_for(num_layers: int) -> float:
    """One column up to 40 layers; the full text width beyond, where one-layer ticks need room."""
    return SINGLE_COLUMN if num_layers <= 40 else DOUBLE_COLUMN


#: What an axes title loses to the y-axis labels (it starts at the axes, not the figure).
TITLE_INSET = 0.8


def wrap(text: str, width_in: float, fontsize: float = 8.0) -> str:
    """``text`` broken into lines that fit ``width_in`` inches (a title must not widen the figure)."""
    chars = max(20, int(width_in * 72 / (0.56 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) if text else text


def layer_axis(axis: Any, num_layers: int) -> None:
    """Integer layer ticks that stay legible from 4 to 80+ layers: a labelled tick every 1, 2, 4, 5, 8 or 10
    layers (at most ~16 labels), a minor tick at every layer."""
    from matplotlib.ticker import MultipleLocator

    step = next((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 50) if num_layers / s <= 16), 100)
    axis.set_major_locator(MultipleLocator(step))
    axis.set_minor_locator(MultipleLocator(1) if num_layers <= 100 else MultipleLocator(step / 2))


def large_spread(values: Any, floor: float) -> bool:
    """Whether a linear axis would flatten most points: the largest magnitude is over 20 times the typical
    (median) one, or over 20 times ``floor`` (the margin) when the typical one is smaller still."""
    import numpy as np

    size = np.abs(np.asarray(values, dtype=float))
    size = size[np.isfinite(size)]
    if not len(size):
        return False
    typical = max(float(np.median(size)), floor, 1e-12)
    return float(size.max()) > 20 * typical


def signed_formatter(suffix: str = "%", signed: bool = True) -> Any:
    """Tick labels like +1%, +1,000%, −10, 0 (a symlog axis's default reads 10^3, −10^1)."""
    from matplotlib.ticker import FuncFormatter

    def fmt(value: float, _pos: int) -> str:
        if value == 0:
            return "0"
        sign = "+" if signed else ""
        text = f"{value:{sign},.0f}" if abs(value) >= 10 else f"{value:{sign}.2g}"
        return (text + suffix).replace("-", "−")
    return FuncFormatter(fmt)


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` (a glance) and ``stem.pdf`` (vector, fonts embedded), rendered then renamed."""
    import matplotlib

    paths = []
    metadata = {"png": {"Software": "lnsdiag"}, "pdf": {"Creator": "lnsdiag", "CreationDate": None}}  # reproducible
    with matplotlib.rc_context(STYLE):  # some settings are read when drawing (fonttype, mathtext)
        for ext in ("png", "pdf"):
            path = stem.with_suffix("." + ext)
            tmp = path.with_name(f".{path.name}.tmp.{ext}")
            fig.savefig(tmp, format=ext, bbox_inches="tight", pad_inches=STYLE["savefig.pad_inches"],
                        metadata=metadata[ext])
            tmp.replace(path)
            paths.append(path)
    if "matplotlib.pyplot" in sys.modules:  # a pyplot figure (a caller's own) is let go; ours are not registered
        sys.modules["matplotlib.pyplot"].close(fig)
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
