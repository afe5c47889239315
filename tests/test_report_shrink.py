"""``lnsdiag shrink``'s report: the pruning-curve table within 100 columns, the summary's claims, the wide
frame, LaTeX, the files written and the figure (a panel per headline metric, a line per strategy)."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from rich.table import Table

from lnsdiag import report
from lnsdiag.report import shrink as rs
from lnsdiag.runners.shrink import ShrinkRun
from lnsdiag.runners.shrink_table import COLUMNS, read_shrink, wide_shrink_frame

# --- a synthetic run, shaped like the real one -------------------------------------------------------

NUM_LAYERS = 32
#: Each strategy's pick of n layers: a contiguous block (angular, last: the same layers for n ≤ 2),
#: single layers ranked by a score (bi, sweep) or chosen one at a time (greedy).
ORDER = {"bi": [22, 25, 27, 29, 20, 24, 18, 26], "sweep": [24, 26, 21, 28, 19, 23, 17, 12],
         "greedy": [24, 26, 28, 21, 19, 23, 3, 12], "given": [5, 9, 13, 17, 21, 25, 29, 1]}
STRATEGIES = ("angular", "bi", "sweep", "greedy", "last")
BASE = {"acc": 0.62, "ppl": 12.5}


def pick(strategy: str, n: int) -> list[int]:
    if strategy == "last" or (strategy == "angular" and n <= 2):
        return list(range(NUM_LAYERS - n, NUM_LAYERS))
    if strategy == "angular":
        return list(range(30 - n, 30))
    return sorted(ORDER[strategy][:n])


def cost(layers: list[int], metric: str) -> float:
    """What removing ``layers`` costs: early layers and the last one dearly (perplexity: the last two)."""
    each = [0.0015 + 0.03 * math.exp(-layer / 4) + (0.01 if layer == 31 else 0) for layer in layers]
    if metric == "ppl":
        each = [c + (0.9 if layer == 31 else 0.45 if layer == 30 else 0) for c, layer in zip(each, layers, strict=True)]
    return sum(each) * (1 + 0.15 * (len(layers) - 1))


def verdict_of(lo90: float, hi90: float, lo95: float, hi95: float, margin: float, higher: bool) -> str:
    if -margin <= lo90 and hi90 <= margin:
        return "dead"
    if lo95 > 0 or hi95 < 0:
        return "helps" if (lo95 > 0) == higher else "hurts"
    return "inconclusive"


def shrink_frame(N: int = 4, strategies=STRATEGIES, tasks=None, verdict: str | None = None) -> pd.DataFrame:
    """A tidy shrink frame (the columns the computation writes): the full model, then each strategy's n = 1..N;
    ``verdict`` forces every removal's verdict."""
    tasks = tasks or {"arc_easy": "acc", "ppl": "ppl"}
    rows = []

    def add(strategy, n, layers, task, metric):
        ppl = metric == "ppl"
        base = BASE["ppl" if ppl else "acc"]
        margin = 0.01 * base if ppl else 0.01
        c = cost(layers, metric)
        value = base * math.exp(1.5 * c) if ppl else max(base - c, 0.25)
        delta = value - base
        se = 0.003 * value if ppl else 0.0025
        full = strategy == "full"
        lo90, hi90, lo95, hi95 = ((math.nan,) * 4 if full else
                                  (delta - 1.645 * se, delta + 1.645 * se, delta - 1.96 * se, delta + 1.96 * se))
        rows.append({
            "strategy": strategy, "n_removed": n, "removed_layers": ",".join(map(str, layers)), "task": task,
            "metric": metric, "value": value, "stderr": 0.02 * base, "baseline": base, "baseline_stderr": 0.02 * base,
            "delta": delta, "delta_stderr": math.nan if full else se, "paired": None if full else True,
            "ci90_low": lo90, "ci90_high": hi90, "ci95_low": lo95, "ci95_high": hi95, "margin": margin,
            "p_value": math.nan if full else 0.01, "p_holm": math.nan if full else 0.04,
            "verdict": None if full else verdict or verdict_of(lo90, hi90, lo95, hi95, margin, not ppl),
            "retention": 100 * base / value if ppl else 100 * (value - 0.25) / (base - 0.25),
            "chance": math.nan if ppl else 0.25, "higher_is_better": not ppl, "group": False,
            "samples": 2000 if ppl else 1172,
            "selection": {"angular": 0.1 + 0.02 * n, "bi": 0.05 * n, "sweep": 0.01 * n}.get(strategy, math.nan)})

    for task, metric in tasks.items():
        add("full", 0, [], task, metric)
    for strategy in strategies:
        for n in range(1, N + 1):
            for task, metric in tasks.items():
                add(strategy, n, pick(strategy, n), task, metric)
    return pd.DataFrame(rows)


FIVE_TASKS = {"mmlu": "acc", "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc", "ppl": "ppl"}


def render(renderable, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


def _tables(renderable) -> list[Table]:
    return [t for item in renderable.render(report.TABLE_WIDTH)
            for t in ([item] if isinstance(item, Table) else [r for r in item.renderables if isinstance(r, Table)])]


# --- table ---------------------------------------------------------------------------------------------

CASES = {
    "N = 4, two tasks": lambda: report.shrink_table(shrink_frame(4), ["arc_easy", "ppl"]),
    "N = 8, two tasks": lambda: report.shrink_table(shrink_frame(8), ["arc_easy", "ppl"]),
    "N = 8, one task": lambda: report.shrink_table(shrink_frame(8, tasks={"ppl": "ppl"}), ["ppl"]),
    "N = 8, five tasks": lambda: report.shrink_table(shrink_frame(8, tasks=FIVE_TASKS), list(FIVE_TASKS),
                                                     "Removing n layers at once — meta-llama/Llama-2-7b-hf"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("width", [80, 100, 160])
def test_table_fits_the_width_and_never_more_than_100_columns(case, width):
    text = render(CASES[case](), width)
    widest = max(len(line) for line in text.splitlines())
    assert widest <= min(width, 100), f"{case}: {widest} columns\n{text}"
    assert not re.search(r"…\s*[│┃]", text), text  # split, not squeezed: no cell or header cut short


def test_table_lists_the_full_model_then_each_strategy_by_n():
    tables = _tables(report.shrink_table(shrink_frame(4), ["arc_easy", "ppl"]))
    assert len(tables) == 1
    headers = [str(c.header) for c in tables[0].columns]
    assert headers == ["strategy", "n", "removed", "arc_easy acc", "Δ pt", "verdict", "ppl", "Δ %", "verdict"]
    strategy, n, removed = (list(map(str, tables[0].columns[i]._cells)) for i in range(3))
    assert len(n) == 1 + 5 * 4 and n[:6] == ["0", "1", "2", "3", "4", "1"]
    assert [s for s in strategy if s] == ["full", *STRATEGIES]
    assert removed[:4] == ["none", "31", "30,31", "27–29"]  # runs of three or more abbreviated
    delta = [str(c) for c in tables[0].columns[4]._cells]
    assert delta[0] == "" and all(d.startswith(("-", "+")) for d in delta[1:])


def test_the_best_value_at_each_n_is_bold_ties_included():
    frame = shrink_frame(4)
    cells = [str(c) for c in _tables(report.shrink_table(frame, ["arc_easy"]))[0].columns[3]._cells]
    bold = [i for i, c in enumerate(cells) if c.startswith("[bold]")]
    # n = 1, 2: angular and last remove the same layers (both bold); n = 3, 4: one winner each
    assert len(bold) == 6 and 0 not in bold


def test_long_removed_layer_lists_are_abbreviated_and_still_fit():
    assert rs.layer_runs("0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15") == "0–15"
    assert rs.layer_runs("3,4,7,12,13,14,15") == "3,4,7,12–15"
    assert rs.layer_runs("") == "" and rs.layer_runs("5") == "5"
    assert rs.layer_runs("5.attn,6.attn,7.attn,8.attn,2.mlp,3") == "3,5–8.attn,2.mlp"  # sub-layers by kind
    assert rs.layer_runs("1.attn,2.attn", "--") == "1.attn,2.attn"
    scattered = ",".join(map(str, range(1, 64, 4)))  # 16 layers, no runs
    cell = rs._removed_cell(scattered)
    assert len(cell) <= rs.REMOVED_WIDTH and cell.startswith("1,5,") and cell.endswith(",61") and "…" in cell
    frame = shrink_frame(4, strategies=("given",))
    frame.loc[frame["strategy"] == "given", "removed_layers"] = scattered
    text = render(report.shrink_table(frame, ["arc_easy", "ppl"]), 100)
    assert max(len(line) for line in text.splitlines()) <= 100 and cell in text


# --- summary -------------------------------------------------------------------------------------------

def test_summary_names_the_best_strategy_at_each_n_and_the_largest_dead_n():
    lines = report.shrink_summary(shrink_frame(4), ["arc_easy", "ppl"])
    assert len(lines) == 2
    acc, _ppl = lines
    # n = 1, 2: sweep and greedy remove the same layers, the least costly; n = 3, 4: the block 27–29 (26–29)
    assert acc.startswith("arc_easy (acc)") and "n = 1: sweep and greedy (0.6184)" in acc
    assert "n = 2: sweep and greedy" in acc and "n = 3: angular (0.6140)" in acc and "n = 4: angular" in acc
    frame = shrink_frame(4)
    dead = frame[(frame["metric"] == "acc") & (frame["verdict"] == "dead")]
    top = int(dead["n_removed"].max())
    who = sorted(dead.loc[dead["n_removed"] == top, "strategy"], key=STRATEGIES.index)
    assert f"Largest n still dead (equivalent to the full model within the margin): {top} of 4, by " in acc
    assert rs._and(who) in acc
    assert "no effect" not in acc.replace("not 'no effect'", "")


def test_summary_says_when_no_removal_is_dead_and_never_calls_inconclusive_no_effect():
    lines = report.shrink_summary(shrink_frame(4, verdict="inconclusive"), ["arc_easy", "ppl"])
    for line in lines:
        assert "No removal of 1–4 layers is dead" in line
        assert "inconclusive" in line and "the data cannot tell, which is not 'no effect'" in line
    hurts = report.shrink_summary(shrink_frame(4, verdict="hurts"), ["ppl"])
    assert len(hurts) == 1 and "No removal of 1–4 layers is dead" in hurts[0] and "inconclusive" not in hurts[0]


# --- wide frame, LaTeX, files ------------------------------------------------------------------------

def test_wide_frame_has_a_row_per_strategy_and_n():
    frame = shrink_frame(4)
    wide = wide_shrink_frame(frame, ["arc_easy", "ppl"])
    assert len(wide) == 1 + 5 * 4
    assert not wide.duplicated(["strategy", "n_removed"]).any()
    assert list(wide.columns[:3]) == ["strategy", "n_removed", "removed_layers"]
    for head in ("arc_easy/acc", "ppl/ppl"):
        for suffix in ("", "_stderr", "_delta", "_delta_stderr", "_verdict"):
            assert f"{head}{suffix}" in wide
    row = wide[(wide["strategy"] == "bi") & (wide["n_removed"] == 3)].iloc[0]
    source = frame[(frame["strategy"] == "bi") & (frame["n_removed"] == 3) & (frame["metric"] == "ppl")].iloc[0]
    assert row["removed_layers"] == "22,25,27" and row["ppl/ppl"] == source["value"]
    assert row["ppl/ppl_verdict"] == source["verdict"]


def test_latex_is_booktabs_with_the_best_value_in_bold():
    tex = report.shrink_latex(shrink_frame(4), ["arc_easy", "ppl"])
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert r"\textbf{" in tex and r"$\pm$" in tex and "27--29" in tex
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 1 + 1 + 5 * 4  # header, full model, every (strategy, n)


def _written(frame: pd.DataFrame, tasks: list[str], folder, meta: dict, plots: bool = True) -> list:
    """What the command writes and lists: the run's own files around the report's LaTeX and plots."""
    run = ShrinkRun(frame, [], tasks, meta, folder, ("ppl", "ppl"))
    return run.write().around(report.write_shrink_report(frame, tasks, folder, plots=plots))


def test_a_run_and_its_report_write_exactly_their_files_and_the_csv_reads_back(tmp_path):
    frame = shrink_frame(4)
    files = _written(frame, ["arc_easy", "ppl"], tmp_path, {"command": "shrink"})
    names = [f.name for f in files]
    assert names == ["shrink.csv", "shrink_wide.csv", "shrink.tex", "shrink.png", "shrink.pdf", "meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # nothing else, no temporary file left
    back = read_shrink(tmp_path / "shrink.csv")
    assert list(back.columns) == COLUMNS and len(back) == len(frame)
    assert back["removed_layers"].tolist() == frame["removed_layers"].tolist()
    assert back.loc[back["n_removed"] == 3, "removed_layers"].iloc[0] == "27,28,29"
    assert all(isinstance(v, str) for v in back["removed_layers"])
    plain = pd.read_csv(tmp_path / "shrink.csv")  # without help: a list with a comma is still text
    assert plain.loc[plain["n_removed"] == 3, "removed_layers"].iloc[0] == "27,28,29"
    np.testing.assert_allclose(back["value"], frame["value"], rtol=1e-9)
    assert _pdf_fonts(tmp_path / "shrink.pdf") == (True, False)
    (tmp_path / "no-plots").mkdir()
    written = _written(frame, ["ppl"], tmp_path / "no-plots", {}, plots=False)
    assert sorted(p.name for p in written) == sorted(p.name for p in (tmp_path / "no-plots").iterdir()) == [
        "meta.json", "shrink.csv", "shrink.tex", "shrink_wide.csv"]


# --- figure --------------------------------------------------------------------------------------------

def _pdf_fonts(path) -> tuple[bool, bool]:
    """(embeds TrueType, has a Type 3 font): matplotlib writes font dictionaries uncompressed."""
    data = path.read_bytes()
    return b"/FontFile2" in data, b"/Type3" in data


def _labelled_lines(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_figure_has_a_panel_per_metric_a_line_per_strategy_and_the_full_model():
    fig = report.shrink_figure(shrink_frame(4), ["arc_easy", "ppl"], "Removing n layers — demo")
    assert len(fig.axes) == 2 and fig.get_size_inches()[0] == report.DOUBLE_COLUMN
    acc, ppl = fig.axes
    assert _labelled_lines(acc) == [*STRATEGIES, "full model"]  # chance: far below every point, left out
    assert _labelled_lines(ppl) == [*STRATEGIES, "full model"]
    full = next(line for line in ppl.get_lines() if line.get_label() == "full model")
    assert full.get_linestyle() == "--" and full.get_ydata()[0] == BASE["ppl"]
    assert ppl.get_yscale() == "log" and acc.get_yscale() == "linear"  # 'last' takes perplexity past 10×
    assert [t for t in ppl.get_xticks() if 0 <= t <= 4] == [0, 1, 2, 3, 4]
    texts = [" ".join(t.get_text().split()) for legend in fig.legends for t in legend.get_texts()]
    assert any("error bars" in t and "paired 90% interval" in t for t in texts)
    assert any(t.startswith("filled: dead") for t in texts) and "full model" in texts
    colours = {line.get_color() for line in acc.get_lines() if line.get_label() in STRATEGIES}
    markers = {h.get_marker() for h in fig.legends[0].legend_handles[:5]}
    assert len(colours) == 5 and len(markers) == 5


def test_each_strategy_keeps_its_colour_and_marker():
    frame = pd.concat([shrink_frame(2), shrink_frame(2, strategies=("given",)).query("strategy == 'given'")])
    fig = report.shrink_figure(frame, ["arc_easy"])
    handles = fig.legends[0].legend_handles[:6]  # a line per strategy, then the full model and the key
    assert {" ".join(h.get_label().split()): (h.get_color(), h.get_marker()) for h in handles} == {
        "angular: least-changing block": ("#0072B2", "o"), "bi: lowest block influence": ("#D55E00", "s"),
        "sweep: smallest one-layer Δ": ("#009E73", "^"), "greedy: one layer at a time": ("#E69F00", "D"),
        "last: the last n layers": ("#CC79A7", "v"), "given: the layers asked for": ("#56B4E9", "P")}


def test_a_newly_registered_strategy_is_ordered_and_styled_without_report_code(monkeypatch):
    from lnsdiag.runners import strategies

    middle = strategies.Strategy("middle", "the layers around the middle", "the middle n layers",
                                 strategies.Need.NOTHING, lambda evidence, n_max: [])
    monkeypatch.setattr(strategies, "STRATEGIES", (*strategies.STRATEGIES, middle))
    frame = shrink_frame(2, strategies=("bi", "sweep", "last"))
    frame["strategy"] = frame["strategy"].replace({"sweep": "middle"})  # listed before last in the frame
    strategy = [str(c) for c in _tables(report.shrink_table(frame, ["arc_easy"]))[0].columns[0]._cells]
    assert [s for s in strategy if s] == ["full", "bi", "last", "middle"]
    fig = report.shrink_figure(frame, ["arc_easy"])
    handles = fig.legends[0].legend_handles[:3]
    assert [" ".join(h.get_label().split()) for h in handles] == [
        "bi: lowest block influence", "last: the last n layers", "middle: the middle n layers"]
    assert [h.get_marker() for h in handles] == ["s", "v", "X"]  # its own, after the five registered before it


def test_dead_points_are_filled_and_the_others_hollow():
    frame = shrink_frame(4, strategies=("angular",), tasks={"arc_easy": "acc"})
    fig = report.shrink_figure(frame, ["arc_easy"])
    assert fig.get_size_inches()[0] == report.SINGLE_COLUMN
    points = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "None"]
    filled = sum(len(p.get_xdata()) for p in points if p.get_markerfacecolor() != "white")
    assert filled == (frame["verdict"] == "dead").sum() and filled < 4


def test_perplexity_stays_linear_when_it_spans_less_than_ten_times_and_panels_grow_with_tasks():
    flat = report.shrink_figure(shrink_frame(4, strategies=("bi", "sweep")), ["ppl"])
    assert flat.axes[0].get_yscale() == "linear"
    five = report.shrink_figure(shrink_frame(8, tasks=FIVE_TASKS), list(FIVE_TASKS))
    assert len(five.axes) == 5 and five.get_size_inches()[0] == report.DOUBLE_COLUMN


@pytest.mark.parametrize("tasks", [["arc_easy"], ["arc_easy", "ppl"]])
def test_nothing_sticks_out_of_the_column_width(tasks, tmp_path):
    from PIL import Image

    fig = report.shrink_figure(shrink_frame(8), tasks, "Removing n layers at once — a-rather-long/model-name-7b")
    width = fig.get_size_inches()[0]
    png, pdf = report.save_figure(fig, tmp_path / "fig")
    with Image.open(png) as im:
        inches = im.width / report.STYLE["savefig.dpi"]
    assert width - 0.5 < inches <= width + 0.05, f"{inches:.2f} in wide, a label sticks out"
    assert _pdf_fonts(pdf) == (True, False)
