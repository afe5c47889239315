"""Turn results (plain DataFrames) into what people read: rich tables, CSV, JSON, plots.

One module per result kind; ``common`` holds the shared style. Plots are written as PNG
(for a glance) and PDF (vector, for a paper).
"""

from .angular import angular_summary, angular_table, plot_angular, plot_angular_heatmap, write_angular
from .common import bar, files_table, frame_to_latex, pyplot, save_figure
from .prune import plot_prune, prune_summary, prune_table, write_prune

__all__ = [
    "angular_summary", "angular_table", "bar", "files_table", "frame_to_latex", "plot_angular",
    "plot_angular_heatmap", "plot_prune", "prune_summary", "prune_table", "pyplot", "save_figure",
    "write_angular", "write_prune",
]

from .compare import compare_tables, latex_tables, plot_compare, write_compare
from .reproduce import plot_reproduce, reproduce_layers_table, reproduce_table, write_reproduce
from .variance import plot_variance, variance_summary, variance_table, write_variance

__all__ += [
    "compare_tables", "latex_tables", "plot_compare", "plot_reproduce", "plot_variance", "reproduce_layers_table",
    "reproduce_table", "variance_summary", "variance_table", "write_compare", "write_reproduce", "write_variance",
]
