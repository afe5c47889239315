"""The smaller model ``shrink`` chose, as a checkpoint: the target checked before any work, and the
pick written with a model card saying what was removed, how, what it scored and what it saves."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.card import model_card
from ..checkpoint.save import SavedCheckpoint, save_without_layers
from ..distributed import on_main
from ..errors import OptionError, UserError
from ..model.load import LoadedModel
from ..model.structure import find_layers
from ..results.verdict import headline_metrics
from .heal import SAVERS, HealOutcome, heal_card_text
from .shrink import ShrinkConfig, ShrinkRun
from .strategies import Pick


def check_save_target(save: str | Path, overwrite: bool, config: ShrinkConfig, save_strategy: str = "best",
                      out: str | Path | None = None) -> None:
    """Fail before any work when :func:`save_pick` could not write ``save`` with ``save_strategy``'s pick
    (``out``: the run's own folder, which the checkpoint must not share)."""
    folder = Path(save)
    if out is not None:
        here, there = folder.expanduser().resolve(), Path(out).expanduser().resolve()
        if here == there or here in there.parents:
            raise OptionError("{save} {value} would hold the run's own results ({out} {there}): give the pruned "
                              "model a folder of its own", value=folder, there=Path(out))
    if folder.exists() and not folder.is_dir():
        raise OptionError("{save} {value} is a file, not a folder", value=folder)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OptionError("{save} {value} is not empty: give {overwrite} to replace it, or another folder",
                          value=folder)
    if save_strategy != "best" and save_strategy not in config.strategies:
        raise OptionError("{save_strategy} {value!r} is not among the strategies run ({run}; or best)",
                          value=save_strategy, run=", ".join(config.strategies))


def save_pick(run: ShrinkRun, loaded: LoadedModel, folder: str | Path, *, strategy: str = "best",
              overwrite: bool = False, layers_path: str | None = None, heal: str | None = None) -> SavedCheckpoint:
    """Write the model without the N layers ``strategy`` picked (``best``: the best value on the
    ranking metric) as a Hugging Face checkpoint with a model card stating what was removed, how,
    and what it scored. ``heal``: the heal folded into it (default: the run's, when it healed that
    pick; ``"none"``: the unhealed model)."""
    pick = run.best() if strategy == "best" else run.pick(strategy)
    outcome = _heal_to_save(run, pick, heal)
    rows = run.frame[(run.frame["strategy"] == pick.strategy) & (run.frame["n_removed"] == pick.n)]
    if outcome is not None:
        rows = run.healed[(run.healed["strategy"] == pick.strategy) & (run.healed["n_removed"] == pick.n)
                          & (run.healed["heal"] == outcome.method)]
    heads = headline_metrics(rows, run.tasks)
    scores = [{"task": t, "metric": m, "value": f"{r['value']:.4g}", "full model": f"{r['baseline']:.4g}",
               "Δ": f"{r['delta']:+.3g} ± {r['delta_stderr']:.2g}", "verdict vs the full model": r["verdict"]}
              for t, m in heads for _, r in rows[(rows["task"] == t) & (rows["metric"] == m)].iterrows()]
    describe = loaded.describe()
    notes = f"Scores from `lnsdiag shrink` ({run.folder}); verdicts: {run.meta['dead_rule']}"
    notes = f"{_savings_text(run, pick)}{notes}"
    if outcome is not None:
        notes = f"{heal_card_text(outcome)} The scores above are the healed model's. {notes}"
    card = model_card(source=describe.get("source"), revision=describe.get("revision"),
                      removed=pick.removal, num_layers=run.meta["num_layers"], strategy=pick.strategy,
                      n=pick.n, scores=scores, notes=notes)
    options = dict(tokenizer=loaded.tokenizer, card=card, overwrite=overwrite,
                   stack=find_layers(loaded.model, layers_path), strategy=pick.strategy, source=describe.get("source"),
                   revision=describe.get("revision"),
                   provenance={"rank_by": "/".join(run.rank_by), "scores": run.folder.as_posix()})
    if outcome is not None:
        patch, save = outcome.patches[pick.removal], SAVERS[outcome.method]
        return on_main(lambda: save(loaded.model, patch, folder, **options))
    return on_main(lambda: save_without_layers(  # one rank writes the checkpoint; the others wait for it
        loaded.model, pick.removal, folder, **options))


def _heal_to_save(run: ShrinkRun, pick: Pick, heal: str | None) -> HealOutcome | None:
    """The heal ``save_pick`` folds in: ``heal`` if named (refused if the run did not heal that pick), the
    run's own by default when it healed the pick, else none."""
    if heal == "none":
        return None
    if heal is None:
        return next((h for h in run.heals.values() if pick.removal in h.patches), None)
    outcome = run.heals.get(heal)
    if outcome is None or pick.removal not in outcome.patches:
        why = outcome.skipped.get(pick.removal) if outcome is not None else None
        raise UserError(f"--save-heal {heal}: the run did not heal {pick.strategy}'s {pick.n}-layer pick"
                        + (f" ({why})" if why else " (give --heal " + heal + ")"))
    return outcome


def _savings_text(run: ShrinkRun, pick: Pick) -> str:
    """What the pick saves, as the run measured it (``lnsdiag.removal_savings``), for the card."""
    record = next((p for p in run.meta.get("picks", []) if p["strategy"] == pick.strategy and p["n_removed"] == pick.n),
                  None)
    rows = run.frame[(run.frame["strategy"] == pick.strategy) & (run.frame["n_removed"] == pick.n)]
    if record is None or "params_removed" not in record or rows.empty:
        return ""
    params, flops = rows["params_removed_pct"].iloc[0], rows["flops_saved_pct"].iloc[0]
    return (f"The removal takes out {record['params_removed']:,} parameters ({params:.1f}%) and saves {flops:.1f}% of "
            f"the FLOPs per token at {run.meta.get('savings_context')} tokens of context (matmuls and attention; "
            "zeroed sub-layers are still computed by plain transformers). ")
