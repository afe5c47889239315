"""How each result reaches the user: its table and summary on the terminal, its files written and listed.

One presenter per result, shared by its command and by ``demo`` (which shows several), so
no command module has to import another. A result writes its own files (CSVs, meta.json); the
presenter adds what the report makes for people (LaTeX, plots) and lists them all. Tables are
:class:`report.Tables`: at most 100 columns wide whatever the console's width, split into several
tables rather than squeezed.
"""

from __future__ import annotations

from pathlib import Path

from .. import distributed, report
from ..checkpoint.save import SavedCheckpoint
from ..measure.angular import AngularRun
from ..measure.variance import VarianceRun
from ..runners.compare import CompareRun
from ..runners.prune import PruneRun
from ..runners.reproduce import ReproduceRun
from ..runners.shrink import ShrinkRun
from . import ui
from .common import print_files


def _say(text: str, **kwargs: object) -> None:
    """A sentence wrapped at the tables' width (a 160-column log line is as hard to read as a wide table)."""
    ui.console.print(text, width=min(ui.console.width, report.TABLE_WIDTH), **kwargs)


def show_angular(run: AngularRun, folder: Path, title: str = "") -> None:
    """Per-layer angular distances and which layers are near-identity; angular.csv, plots, meta.json."""
    if not distributed.is_main():  # one rank writes and shows; the others computed their share
        return
    result = run.result
    ui.console.print(report.angular_table(result, title or f"Angular distance per layer — {run.model_name}"))
    _say(report.angular_summary(result))
    print_files(run.write(folder).around(report.write_angular_report(result, folder, title)))


def show_variance(run: VarianceRun, folder: Path, title: str = "") -> None:
    """Residual-stream variance and update ratio per layer; variance.csv, plot, meta.json."""
    if not distributed.is_main():  # one rank writes and shows; the others computed their share
        return
    result = run.result
    ui.console.print(report.variance_table(result, title or f"Residual stream per layer — {run.model_name}",
                                           run.placement))
    _say(report.variance_summary(result))
    print_files(report.write_variance(result, folder, run.meta, title))


def show_reproduce(run: ReproduceRun, folder: Path, title: str = "") -> None:
    """The twins side by side, per layer, and what came out in words; summary, per-model folders, plots."""
    if not distributed.is_main():  # one rank writes and shows; the others computed their share
        return
    result = run.result
    ui.console.print(report.reproduce_table(result, title))
    ui.console.print()
    ui.console.print(report.reproduce_layers_table(result))
    for line in result.headline():
        _say(line, highlight=False)
    print_files(report.write_reproduce(result, folder, run.meta))


def show_compare(run: CompareRun, folder: Path) -> None:
    """One table per metric, runs aligned by relative depth; compare.csv, LaTeX, overlay plots."""
    if not distributed.is_main():  # one rank writes and shows; the others computed their share
        return
    ui.console.print(report.compare_tables(run.comparison))
    print_files(report.write_compare(run.comparison, folder, run.meta))


def _verdicts(table: report.Tables, summary: list[str], rule: str) -> None:
    """A table of removals, what it says in words, and the rule its verdicts follow."""
    ui.console.print(table)
    for line in summary:
        _say(line)
    _say(f"[dim]{rule}[/dim]")


def _say_work(block: int | None, naive: int | None, what: str) -> None:
    """The counted work (block-token passes) against the naive engine's for the same variants."""
    if block and naive:
        _say(f"[dim]work: {block:,} block-token passes, {naive:,} for the naive engine ({naive / block:.2f}× less; "
             f"{what})[/dim]")


def show_prune(run: PruneRun, title: str = "") -> None:
    """The sweep's table, dead-weight summary and rule; prune.csv, the wide CSV, LaTeX, plots, meta.json."""
    if not distributed.is_main():  # one rank writes and shows; the others computed their share
        return
    name = run.meta["model"]["name"]
    _verdicts(report.prune_table(run.frame, run.tasks, title or f"Layer removal — {name}"),
              report.prune_summary(run.frame, run.tasks), run.meta["dead_rule"])
    work = run.meta.get("engine_stats") or {}
    _say_work(work.get("block_tokens"), work.get("naive_block_tokens"),
              f"shared prefixes: {work.get('sharing') or 'off'}")
    print_files(write_prune(run, title=title))


def write_prune(run: PruneRun, *, plots: bool = True, title: str = "") -> list[Path]:
    """The sweep's own files and the report's LaTeX and plots of it (``plots=False``: while it runs), as listed."""
    return run.write().around(report.write_prune_report(run.frame, run.tasks, run.folder, plots=plots, title=title))


def show_shrink(run: ShrinkRun, saved: SavedCheckpoint | None = None, title: str = "") -> None:
    """The pruning curves as a table, what they say, the work done; shrink.csv, wide CSV, LaTeX, plot,
    meta.json; and the saved checkpoint, if any."""
    if not distributed.is_main():  # one rank writes and shows; the others computed their share
        return
    name = run.meta["model"]["name"]
    _verdicts(report.shrink_table(run.frame, run.tasks, title or f"Removing layers together — {name}"),
              report.shrink_summary(run.frame, run.tasks), run.meta["dead_rule"])
    _say(f"[dim]sweep, greedy and --save-strategy best rank removals by {'/'.join(run.rank_by)}[/dim]")
    for method in (list(dict.fromkeys(run.healed["heal"])) if len(run.healed) else []):
        ui.console.print(report.shrink_table(report.healed_rows(run.frame, run.healed, method), run.tasks,
                                             f"Healed ({method}{', no training' if method == 'linear' else ''})"
                                             f" — {name}"))
    for line in report.heal_summary(run.frame, run.healed, run.tasks):
        _say(line)
    for removal, why in ((r, w) for h in run.heals.values() for r, w in h.skipped.items()):
        _say(f"[yellow]not healed: {removal.label}: {why}[/yellow]")
    passes = run.meta["passes"]
    _say_work(sum(p.get("block_tokens") or 0 for p in passes), sum(p.get("naive_block_tokens") or 0 for p in passes),
              f"{run.meta['sets_scored']} removal sets in {len(passes)} pass(es)")
    print_files(run.write().around(report.write_shrink_report(run.frame, run.tasks, run.folder, title=title,
                                                              healed=run.healed)))
    if saved is not None:
        heal = saved.provenance.get("heal")
        _say(f"saved the model without layers {','.join(map(str, saved.removed))}"
             f"{' healed (' + heal.get('method', '') + ')' if isinstance(heal, dict) else ''} "
             f"({saved.provenance.get('strategy')}) to {saved.folder}: {len(saved.kept)} layers, "
             f"{saved.num_parameters / 1e6:,.1f}M parameters; load it with AutoModelForCausalLM.from_pretrained")
