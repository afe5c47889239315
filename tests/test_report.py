"""Reports a paper can take: tables within 100 columns (split, not squeezed), no blank columns, one
header line; figures at column widths, vector PDFs with TrueType fonts, every layer readable."""

from __future__ import annotations

import io
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console
from rich.table import Table

from lnsdiag import report
from lnsdiag.measure.angular import AngularResult
from lnsdiag.measure.variance import VarianceResult
from lnsdiag.runners.compare import RunResults, compare_runs
from lnsdiag.runners.reproduce import PRESETS, ReproduceResult, TwinRun

# --- synthetic results, shaped like the real ones (the CSV columns) ---------------------------

DEMO_PPL_PCT = [868.5, 19.6, 0.3, 0.3, 0.5, 1.5, 0.3, 1.1, 1.4, 3.4, 1.1, 2.4]  # the demo's Δppl %
VERDICTS = ("dead", "hurts", "helps", "inconclusive")


def _effects(num_layers: int) -> list[float]:
    """Relative removal effects: the demo's 12, then a slow decay with some noise (deterministic)."""
    rng = np.random.default_rng(num_layers)
    tail = [0.8 + 3.0 * math.exp(-i / 10) + float(rng.normal(0, 0.4)) for i in range(num_layers)]
    return (DEMO_PPL_PCT + tail)[:num_layers]


def prune_frame(num_layers: int = 12, tasks: dict[str, str] | None = None, spread: bool = True) -> pd.DataFrame:
    """A tidy sweep (prune.csv's columns) with every verdict present; ``spread=False``: no layer dwarfs
    the others (a linear axis reads fine)."""
    tasks = tasks or {"ppl": "ppl"}
    effects = _effects(num_layers) if spread else [1.0 + (i % 5) * 0.4 for i in range(num_layers)]
    rows = []
    for layer in [None, *range(num_layers)]:
        for t, (task, metric) in enumerate(tasks.items()):
            ppl = metric == "ppl"
            base = 247.6 if ppl else 0.6
            margin = 0.01 * base if ppl else 0.01
            if layer is None:
                value, delta, se, verdict, low, high = base, 0.0, math.nan, None, math.nan, math.nan
            else:
                pct = effects[layer] * (1 + 0.1 * t)
                delta = base * pct / 100 if ppl else -min(pct, 60) / 100 * 0.58
                verdict = VERDICTS[(layer + t) % 4] if layer > 1 else "hurts"
                if verdict == "dead":
                    delta = 0.2 * margin
                elif verdict == "helps":
                    delta = -1.5 * margin if ppl else 1.5 * margin
                se = abs(delta) * 0.05 + margin * (0.6 if verdict == "inconclusive" else 0.1)
                value, low, high = base + delta, delta - 1.645 * se, delta + 1.645 * se
            rows.append({
                "variant": "baseline" if layer is None else f"layer_{layer:03d}", "removed_layer": layer,
                "task": task, "metric": metric, "value": value, "stderr": base * 0.02, "baseline": base,
                "baseline_stderr": base * 0.02, "delta": delta, "delta_stderr": se, "paired": True,
                "ci90_low": low, "ci90_high": high, "ci95_low": low, "ci95_high": high, "margin": margin,
                "p_value": math.nan, "p_holm": math.nan, "verdict": verdict,
                "dead": None if layer is None else verdict == "dead",
                "documents_needed": 5000.0 if verdict == "inconclusive" else math.nan,
                "retention": 100.0 if layer is None else 100 * base / value if ppl else 100 * value / base,
                "chance": math.nan if ppl else 0.25, "higher_is_better": not ppl, "group": False, "samples": 256,
                "angular_distance": math.nan if layer is None else 0.45 / (1 + layer)})
    frame = pd.DataFrame(rows)
    frame["removed_layer"] = frame["removed_layer"].astype(float)
    return frame


def angular_result(num_layers: int = 12) -> AngularResult:
    d = [0.45 / (1 + i) + 0.02 for i in range(num_layers)]
    layers = pd.DataFrame({"layer": range(num_layers), "angular_distance": d, "block_influence": [x * 1.5 for x in d],
                           "cosine": [math.cos(math.pi * x) for x in d], "near_identity": [x < 0.2 for x in d]})
    blocks = pd.DataFrame([{"start_layer": s, "block_size": n, "angular_distance": min(0.5, sum(d[s:s + n])),
                            "block_influence": 0.0}
                           for n in range(1, num_layers + 1) for s in range(num_layers - n + 1)])
    return AngularResult(layers=layers, blocks=blocks, tokens=32512, token_mode="all", threshold=0.2)


def variance_result(num_layers: int = 12, growth: float = 1.1) -> VarianceResult:
    var = [0.003] + [30.0 * growth ** i for i in range(num_layers)]
    ratio = [102.0] + [0.1 + 0.05 * (i % 3) for i in range(num_layers - 1)] + [math.nan]
    layers = pd.DataFrame({"layer": range(num_layers + 1), "variance": var, "rms": [math.sqrt(v) for v in var],
                           "update_ratio": ratio})
    return VarianceResult(layers=layers, tokens=32512, token_mode="all")


def twins(norms: tuple[str, ...] = ("pre-ln", "lns"), num_layers: int = 12) -> ReproduceResult:
    runs = []
    for k, norm in enumerate(norms):
        sweep = prune_frame(num_layers)
        sweep["value"] = sweep["value"] * (1 - 0.05 * k)
        runs.append(TwinRun(norm=norm, name=f"demo-{norm}", path=Path(norm), placement=f"{norm} placement",
                            record={"train": {"steps": 250, "final_train_loss": 5.4 - 0.2 * k,
                                              "loss_every_10_steps": [8.0 - 0.1 * i - 0.05 * k for i in range(25)]}},
                            parameters=3_083_392, perplexity=247.6 * (1 - 0.05 * k),
                            angular=angular_result(num_layers), variance=variance_result(num_layers, 1.1 - 0.05 * k),
                            sweep=sweep))
    return ReproduceResult(spec=PRESETS["demo"], train_text="docs[train]", eval_text="docs[test]", eval_tokens=32512,
                           runs=runs)


def comparison(runs: int = 2, long_labels: bool = False):
    out = []
    for r in range(runs):
        n = 12 + 4 * r
        values = pd.DataFrame([{"metric": m, "layer": i, "value": (0.4 / (1 + i) if m == "angular_distance"
                                                                    else 0.003 * 10 ** (i / 3))}
                               for m in ("angular_distance", "variance") for i in range(n)])
        label = f"organisation-name/a-rather-long-model-name-{r}" if long_labels else f"run{r}"
        out.append(RunResults(label=label, folder=Path(label), num_layers=n, values=values))
    return compare_runs(out)


# --- tables ---------------------------------------------------------------------------------------

def render(renderable, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


def _tables(renderable) -> list[Table]:
    out = []
    for item in renderable.render(report.TABLE_WIDTH):
        out += [item] if isinstance(item, Table) else [r for r in item.renderables if isinstance(r, Table)]
    return out


CASES = {
    "demo angular": lambda: report.angular_table(angular_result(12), "Angular distance per layer — demo-llama"),
    "80-layer angular": lambda: report.angular_table(angular_result(80)),
    "demo prune": lambda: report.prune_table(prune_frame(12), ["ppl"], "Removing one layer of demo-llama-12L-128d: "
                                             "perplexity on held-out docstrings"),
    "prune, five tasks": lambda: report.prune_table(prune_frame(32, {
        "mmlu": "acc", "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc", "ppl": "ppl"}),
        ["mmlu", "hellaswag", "arc_challenge", "winogrande", "ppl"], "Layer removal — meta-llama/Llama-2-7b-hf"),
    "prune, twelve tasks": lambda: report.prune_table(
        prune_frame(8, {f"a_rather_long_task_name_{i}": "acc" for i in range(12)}),
        [f"a_rather_long_task_name_{i}" for i in range(12)], "Layer removal"),
    "twins": lambda: report.reproduce_table(twins(), "demo-llama-12L-128d: Pre-LN vs LNS (same seed, data and "
                                            "steps; held-out docstrings)"),
    "three twins": lambda: report.reproduce_table(twins(("pre-ln", "lns", "post-ln"))),
    "twins per layer": lambda: report.reproduce_layers_table(twins()),
    "three twins per layer": lambda: report.reproduce_layers_table(twins(("pre-ln", "lns", "post-ln"))),
    "variance": lambda: report.variance_table(variance_result(12), "Residual stream per layer — demo", "pre-LN"),
    "compare": lambda: report.compare_tables(comparison(2)),
    "compare, eight long labels": lambda: report.compare_tables(comparison(8, long_labels=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("width", [80, 100, 160])
def test_tables_fit_the_width_and_never_more_than_100_columns(case, width):
    text = render(CASES[case](), width)
    widest = max(len(line) for line in text.splitlines())
    assert widest <= min(width, 100), f"{case}: {widest} columns\n{text}"
    assert "…" not in text  # split, not squeezed: no cell or header cut short


@pytest.mark.parametrize("case", CASES)
def test_tables_have_one_header_line_and_no_blank_column(case):
    renderable = CASES[case]()
    for table in _tables(renderable):
        for column in table.columns:
            assert column.header and "\n" not in str(column.header), column.header
            cells = [re.sub(r"\[/?[a-z ]*\]", "", str(c)).strip() for c in column._cells]
            assert any(c not in ("", "–") for c in cells), f"{case}: column {column.header!r} is blank"
    text = render(renderable, 100)
    lines = text.splitlines()
    tops = [i for i, line in enumerate(lines) if line.startswith("┏")]
    assert tops
    for top in tops:  # header row between ┏ and ┡: exactly one line
        assert lines[top + 2].startswith("┡"), f"{case}: header of more than one line\n{text}"


def test_demo_prune_table_reads_as_before_without_the_doubled_header():
    text = render(report.prune_table(prune_frame(12), ["ppl"], "Layer removal"), 100)
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert [h.strip() for h in header.strip("┃").split("┃")] == [
        "removed", "ppl ±stderr", "Δ ±stderr (paired)", "verdict", "kept %", "ang. dist."]
    assert "baseline" in text and "+2150" in text


def test_several_tasks_split_into_a_table_per_task_and_the_verdicts_across_them():
    tasks = {"mmlu": "acc", "hellaswag": "acc_norm", "ppl": "ppl"}
    tables = _tables(report.prune_table(prune_frame(12, tasks), list(tasks), "Layer removal"))
    titles = [str(t.title) for t in tables]
    assert titles == ["Layer removal — mmlu (acc)", "Layer removal — hellaswag (acc_norm)", "Layer removal — ppl",
                      "Layer removal — verdicts across tasks"]
    across = tables[-1]
    assert [str(c.header) for c in across.columns] == ["removed", "dead on", "mmlu", "hellaswag", "ppl"]
    twelve = render(CASES["prune, twelve tasks"](), 100)
    assert "verdicts across tasks (1 of" in twelve  # too many tasks for one table: split, keys repeated


def test_empty_columns_are_dropped():
    frame = prune_frame(6)
    frame["angular_distance"] = math.nan
    text = render(report.prune_table(frame, ["ppl"]), 100)
    assert "ang. dist." not in text
    far = angular_result(4)
    far.layers["near_identity"] = False
    assert "near-identity" not in render(report.angular_table(far), 100)


def test_three_twins_per_layer_split_between_quantities():
    text = render(report.reproduce_layers_table(twins(("pre-ln", "lns", "post-ln"))), 100)
    assert "Δppl Post-LN" in text and "ang. dist. Post-LN" in text


# --- figures --------------------------------------------------------------------------------------

def _pdf_fonts(path: Path) -> tuple[bool, bool]:
    """(embeds TrueType, has a Type 3 font): matplotlib writes font dictionaries uncompressed."""
    data = path.read_bytes()
    return b"/FontFile2" in data, b"/Type3" in data


def _png_inches(path: Path) -> tuple[float, float]:
    with Image.open(path) as im:
        return im.width / report.STYLE["savefig.dpi"], im.height / report.STYLE["savefig.dpi"]


def _legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _no_overlap(labels) -> None:
    boxes = [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]
    for a, b in itertools.pairwise(boxes):
        assert not a.overlaps(b), "tick labels overlap"


FIGURES = {
    "prune": (lambda: report.prune_figure(prune_frame(12), ["ppl"], "Removing one layer of demo-llama-12L-128d: "
                                          "perplexity on held-out docstrings"), report.DOUBLE_COLUMN),
    "angular": (lambda: report.angular_figure(angular_result(12), "Angular distance per layer — demo-llama-12L-128d "
                                              "(held-out docstrings)"), report.SINGLE_COLUMN),
    "heatmap": (lambda: report.angular_heatmap_figure(angular_result(12)), report.SINGLE_COLUMN),
    "variance": (lambda: report.variance_figure(variance_result(12)), report.SINGLE_COLUMN),
    "twins": (lambda: report.reproduce_figure(twins()), report.DOUBLE_COLUMN),
    "compare": (lambda: report.compare_figure(comparison(2), "variance"), report.SINGLE_COLUMN),
    "80-layer prune": (lambda: report.prune_figure(prune_frame(80, {"mmlu": "acc", "ppl": "ppl"}), ["mmlu", "ppl"]),
                       report.DOUBLE_COLUMN),
    "80-layer heatmap": (lambda: report.angular_heatmap_figure(angular_result(80)), report.DOUBLE_COLUMN),
    "48-layer angular": (lambda: report.angular_figure(angular_result(48)), report.DOUBLE_COLUMN),
    "compare, six long labels": (lambda: report.compare_figure(comparison(6, long_labels=True), "angular_distance"),
                                 report.SINGLE_COLUMN),
}


@pytest.mark.parametrize("case", FIGURES)
def test_figures_are_column_wide_vector_pdfs_with_truetype_fonts(case, tmp_path):
    make, width = FIGURES[case]
    fig = make()
    assert fig.get_size_inches()[0] == width
    png, pdf = report.save_figure(fig, tmp_path / "fig")
    assert png.suffix == ".png" and pdf.suffix == ".pdf" and pdf.read_bytes().startswith(b"%PDF")
    truetype, type3 = _pdf_fonts(pdf)
    assert truetype and not type3
    w, _h = _png_inches(png)
    assert width - 0.5 < w <= width + 0.05, f"{case}: {w:.2f} in wide, a label sticks out"  # nothing outside
    fig.canvas.draw()
    for ax in fig.axes:
        _no_overlap(ax.get_xticklabels())
        _no_overlap(ax.get_yticklabels())


def test_prune_figure_marks_verdicts_labels_error_bars_and_uses_symlog_when_one_layer_dwarfs_the_rest():
    fig = report.prune_figure(prune_frame(12), ["ppl"])
    texts = _legend_texts(fig)
    for verdict in VERDICTS:
        assert any(t.startswith(verdict) for t in texts), texts
    assert any("error bars" in t and "90% interval" in t and "paired" in t for t in texts)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog" and "% of baseline" in ax.get_ylabel()
    assert ax.get_title(loc="left") == "ppl: 2 dead, 4 hurts, 3 helps, 3 inconclusive"
    flat = report.prune_figure(prune_frame(12, spread=False), ["ppl"])
    assert flat.axes[0].get_yscale() == "linear"
    acc = report.prune_figure(prune_frame(12, {"mmlu": "acc"}), ["mmlu"])
    assert acc.axes[0].get_yscale() == "symlog" and "points" in acc.axes[0].get_ylabel()


def test_every_layer_is_readable_on_a_symlog_axis():
    """Layer 0 at +870 %, deep layers at +0.3 %: on the axis, the deep ones are apart from zero."""
    fig = report.prune_figure(prune_frame(12), ["ppl"])
    ax = fig.axes[0]
    fig.canvas.draw()
    to_px = ax.transData.transform
    zero = to_px((0, 0))[1]
    small = to_px((2, 0.3))[1]
    top, bottom = ax.get_window_extent().y1, ax.get_window_extent().y0
    assert (small - zero) / (top - bottom) > 0.05  # a 0.3 % effect is at least 5 % of the panel above zero


def test_layer_ticks_stay_legible_up_to_80_layers():
    for layers, most in ((12, 12), (32, 16), (48, 16), (80, 16)):
        fig = report.angular_figure(angular_result(layers))
        ax = fig.axes[0]
        ticks = [t for t in ax.get_xticks() if -0.6 <= t <= layers]
        assert len(ticks) <= most + 1
        assert len(ax.xaxis.get_minorticklocs()) >= layers - len(ticks) - 2  # a minor tick at every layer


def test_heatmap_axes_and_colour_bar_are_labelled():
    fig = report.angular_heatmap_figure(angular_result(32))
    heat, bar = fig.axes
    assert "start layer" in heat.get_xlabel() and "block size n" in heat.get_ylabel()
    assert "angular distance" in bar.get_ylabel()


def test_variance_update_ratio_goes_log_when_the_first_layer_dwarfs_the_rest():
    fig = report.variance_figure(variance_result(12))
    top, low = fig.axes
    assert top.get_yscale() == "log" and low.get_yscale() == "log"
    even = variance_result(12)
    even.layers.loc[0, "update_ratio"] = 0.2
    assert report.variance_figure(even).axes[1].get_yscale() == "linear"


def test_plots_leave_the_callers_matplotlib_settings_alone():
    import matplotlib

    before = matplotlib.rcParams["font.size"], matplotlib.rcParams["pdf.fonttype"]
    report.angular_figure(angular_result(6))
    assert (matplotlib.rcParams["font.size"], matplotlib.rcParams["pdf.fonttype"]) == before


def test_a_sweep_writes_its_tables_and_the_report_png_and_pdf(tmp_path):
    from lnsdiag.cli.show import write_prune
    from lnsdiag.runners.prune import PruneRun

    files = write_prune(PruneRun(prune_frame(12), ["ppl"], {"model": {"name": "x"}}, tmp_path, None))
    assert [f.name for f in files] == ["prune.csv", "prune_wide.csv", "prune.tex", "prune.png", "prune.pdf",
                                       "meta.json"]
    assert _pdf_fonts(tmp_path / "prune.pdf") == (True, False)


# --- the presenters, as a command prints them into a log ------------------------------------------

def test_presenters_keep_piped_output_within_100_columns(monkeypatch, tmp_path):
    """Without a terminal the console is 160 wide: tables and sentences still fit 100 columns."""
    from lnsdiag.cli import show, ui
    from lnsdiag.measure.angular import AngularRun
    from lnsdiag.measure.variance import VarianceRun
    from lnsdiag.runners.prune import PruneRun
    from lnsdiag.runners.reproduce import ReproduceRun

    console = Console(file=io.StringIO(), width=160, color_system=None)
    monkeypatch.setattr(ui, "console", console)
    for sub in "pavr":
        (tmp_path / sub).mkdir()
    meta = {"model": {"name": "org/a-model"}, "norm_placement": "pre-LN",
            "dead_rule": "dead: the 90% interval of Δ (paired, same documents) lies within the margin " * 4}
    tasks = {"mmlu": "acc", "hellaswag": "acc_norm", "ppl": "ppl"}
    show.show_prune(PruneRun(prune_frame(32, tasks), list(tasks), meta, tmp_path / "p", None))
    show.show_angular(AngularRun(angular_result(32), meta), tmp_path / "a")
    show.show_variance(VarianceRun(variance_result(32), meta), tmp_path / "v")
    show.show_reproduce(ReproduceRun(twins(), meta), tmp_path / "r")
    lines = [line for line in console.file.getvalue().splitlines() if not line.lstrip().startswith("wrote")]
    assert max(len(line) for line in lines) <= 100
    assert (tmp_path / "p" / "prune.pdf").exists() and (tmp_path / "v" / "variance.pdf").exists()
