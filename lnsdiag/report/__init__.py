"""Turn results (plain DataFrames) into what people read: rich tables, LaTeX, plots.

A result writes its own machine-readable files (``run.write()``: CSVs, meta.json); ``write_*_report``
adds the LaTeX and plots. (``write_variance``, ``write_compare`` and ``write_reproduce`` still write
their results' CSVs and meta.json here too.)

One module per result kind; ``common`` holds the shared style: tables that split rather than wrap
to fit 100 columns, figures sized for a paper's column (PNG for a glance, PDF with embedded
TrueType fonts for the paper). Each ``*_figure`` returns the matplotlib figure; ``plot_*`` saves it.
"""

from .angular import (
    angular_figure,
    angular_heatmap_figure,
    angular_summary,
    angular_table,
    plot_angular,
    plot_angular_heatmap,
    write_angular_report,
)
from .common import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    STYLE,
    TABLE_WIDTH,
    Tables,
    bar,
    files_table,
    frame_to_latex,
    pyplot,
    save_figure,
)
from .prune import plot_prune, prune_figure, prune_summary, prune_table, write_prune_report

__all__ = [
    "DOUBLE_COLUMN", "SINGLE_COLUMN", "STYLE", "TABLE_WIDTH", "Tables", "angular_figure", "angular_heatmap_figure",
    "angular_summary", "angular_table", "bar", "files_table", "frame_to_latex", "plot_angular",
    "plot_angular_heatmap", "plot_prune", "prune_figure", "prune_summary", "prune_table", "pyplot", "save_figure",
    "write_angular_report", "write_prune_report",
]

from .compare import compare_figure, compare_tables, latex_tables, plot_compare, write_compare
from .heal import heal_summary
from .reproduce import plot_reproduce, reproduce_figure, reproduce_layers_table, reproduce_table, write_reproduce
from .shrink import (
    healed_rows,
    plot_shrink,
    shrink_figure,
    shrink_latex,
    shrink_summary,
    shrink_table,
    write_shrink_report,
)
from .variance import plot_variance, variance_figure, variance_summary, variance_table, write_variance

__all__ += [
    "compare_figure", "compare_tables", "latex_tables", "plot_compare", "plot_reproduce", "plot_variance",
    "reproduce_figure", "reproduce_layers_table", "reproduce_table", "variance_figure", "variance_summary",
    "variance_table", "write_compare", "write_reproduce", "write_variance",
]

__all__ += [
    "heal_summary", "healed_rows", "plot_shrink", "shrink_figure",
    "shrink_latex", "shrink_summary", "shrink_table", "write_shrink_report",
]
