"""`lnsdiag variance`, `reproduce` and `compare`: why deep layers die, and how LNS changes that."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import report, ui
from ..errors import UserError
from ..models import LoadedModel, model_slug
from ..runs import Timer, output_dir, run_record
from .common import (
    Dataset,
    DatasetConfig,
    Debug,
    Device,
    DeviceMap,
    Dtype,
    LayersPath,
    MaxTokens,
    ModelArg,
    ModelOpt,
    Out,
    Revision,
    SeqLen,
    Split,
    TextField,
    TextFile,
    TrustRemote,
    app,
    command,
    load,
    model_name,
    print_files,
    text_source,
)

Tokens = Annotated[str, typer.Option(help="all: every non-padding token; last: each sequence's last token.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")]
ReproduceOut = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder \\[default: "
                                                   "results/reproduce/<size>].", show_default=False)]
CompareOut = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder \\[default: "
                                                 "results/compare/<runs>].", show_default=False)]


# --- variance -------------------------------------------------------------------------------

@app.command("variance")
@command
def variance_cmd(
    model: ModelArg = None, model_opt: ModelOpt = None, revision: Revision = None, dtype: Dtype = "auto",
    device: Device = "auto", device_map: DeviceMap = None, trust_remote_code: TrustRemote = False,
    layers_path: LayersPath = None,
    text_file: TextFile = None, text_field: TextField = "text", dataset: Dataset = None,
    dataset_config: DatasetConfig = None, split: Split = None, max_tokens: MaxTokens = 65_536,
    seq_len: SeqLen = None, tokens: Tokens = "all", batch_size: BatchSize = 4,
    out: Out = None, debug: Debug = False,
) -> None:
    """Residual-stream variance per layer and how much each layer changes its input (Pre-LN growth)."""
    name = model_name(model, model_opt)
    if tokens not in ("all", "last"):
        raise UserError(f"--tokens must be all or last, not {tokens!r}")
    folder = output_dir(out, model_slug(name), "variance")
    source = text_source(text_file, dataset, dataset_config, split, text_field)
    timer = Timer()
    with timer("load"):
        loaded = load(name, revision, dtype, device, device_map, trust_remote_code)
    run_variance(loaded, source, folder, timer=timer, layers_path=layers_path, seq_len=seq_len,
                 max_tokens=max_tokens, batch_size=batch_size, tokens=tokens)


def run_variance(loaded: LoadedModel, source: Any, folder: Path, *, timer: Timer | None = None,
                 layers_path: str | None = None, title: str = "", **settings: Any) -> Any:
    """Measure, show and write the variance table of one model."""
    from ..metrics import default_seq_len
    from ..surgery import find_layers, norm_placement
    from ..variance import variance_on_text

    timer = timer or Timer()
    stack = find_layers(loaded.model, layers_path)
    settings["seq_len"] = default_seq_len(loaded.model, settings.get("seq_len"))
    placement = norm_placement(loaded.model, stack)
    with ui.make_progress() as progress, timer("measure"):
        task = progress.add_task("residual variance", total=None)
        result = variance_on_text(
            loaded, source.texts, stack=stack,
            progress=lambda done, total: progress.update(task, completed=done, total=total), **settings)
    meta = run_record(
        "variance", model=loaded.describe(), text=source.name, tokens_used=result.tokens, layer_stack=stack.path,
        num_layers=len(stack), norm_placement=placement, settings=settings,
        timings={**timer.seconds, "total": timer.total()},
    )
    ui.console.print(report.variance_table(result, title or f"Residual stream per layer — {loaded.name}", placement))
    ui.console.print(report.variance_summary(result))
    print_files(report.write_variance(result, folder, meta, title))
    return result


# --- reproduce ------------------------------------------------------------------------------

def _opt(help_text: str) -> Any:
    return typer.Option(help=help_text, show_default=False)


@app.command("reproduce")
@command
def reproduce_cmd(
    preset: Annotated[str, typer.Option(help="demo (12×128, minutes on a CPU) or llama-130m (the paper's "
                                             "smallest: 12 layers, hidden 768; for a GPU).")] = "demo",
    norms: Annotated[str, typer.Option(help="Models to train, comma-separated: pre-ln, lns, post-ln.")] = "pre-ln,lns",
    layers: Annotated[int | None, _opt("Blocks \\[preset].")] = None,
    hidden: Annotated[int | None, _opt("Hidden size \\[preset].")] = None,
    heads: Annotated[int | None, _opt("Attention heads \\[preset].")] = None,
    intermediate: Annotated[int | None, _opt("MLP size \\[preset].")] = None,
    vocab: Annotated[int | None, _opt("BPE vocabulary trained on the text \\[preset].")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence \\[preset].",
                                                show_default=False)] = None,
    train_batch_size: Annotated[int | None, typer.Option("--train-batch-size", help="Sequences per training step "
                                                         "\\[preset].", show_default=False)] = None,
    steps: Annotated[int | None, _opt("Training steps \\[preset: 250 for demo].")] = None,
    lr: Annotated[float | None, _opt("Peak learning rate \\[preset].")] = None,
    seed: Annotated[int | None, _opt("Seed for weights and batches (shared by the twins) \\[0].")] = None,
    init: Annotated[str, typer.Option(help="default, or scaled (output projections std/sqrt(2L); the paper "
                                           "says it conflicts with LNS).")] = "default",
    text_file: Annotated[Path | None, typer.Option("--text-file", help="Train on this text (plain or JSONL); its "
                                                   "last tenth is held out \\[default: stdlib docstrings].",
                                                   show_default=False)] = None,
    text_field: TextField = "text",
    eval_text_file: Annotated[Path | None, typer.Option("--eval-text-file", help="Held-out text \\[default: the "
                                                        "held-out part of the training text].",
                                                        show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens to measure on.")] = 16_384,
    batch_size: BatchSize = 8,
    threshold: Annotated[float, typer.Option(help="Near-identity threshold on angular distance.")] = 0.2,
    device: Device = "auto",
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain even if cached models exist.")] = False,
    out: ReproduceOut = None, debug: Debug = False,
) -> None:
    """Train Pre-LN and LNS twins (same seed, data, steps) and compare angular distance, variance, perplexity."""
    from ..models import pick_device
    from ..reproduce import parse_norms, spec_from
    from ..text import from_file

    chosen = parse_norms(norms)
    if init not in ("default", "scaled"):
        raise UserError(f"--init must be default or scaled, not {init!r}")
    spec = spec_from(preset, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate, vocab=vocab,
                     seq_len=seq_len, batch_size=train_batch_size, steps=steps, lr=lr, seed=seed, init=init)
    text = from_file(text_file, text_field) if text_file is not None else None
    eval_text = from_file(eval_text_file, text_field) if eval_text_file is not None else None
    base = re.sub(r"-(pre-ln|lns|post-ln)$", "", spec.with_(norm="pre-ln").name)
    suffix = "" if text_file is None else "-" + model_slug(Path(text_file).stem)
    folder = output_dir(out, "reproduce", base + suffix)
    run_reproduce(spec, chosen, folder, text=text, eval_text=eval_text, eval_tokens=eval_tokens,
                  batch_size=batch_size, threshold=threshold, device=pick_device(device), fresh=fresh)


def run_reproduce(spec: Any, norms: list[str], folder: Path, *, text: Any = None, eval_text: Any = None,
                  eval_tokens: int = 16_384, batch_size: int = 8, threshold: float = 0.2, device: Any = "cpu",
                  fresh: bool | list[str] = False, title: str = "") -> Any:
    """Train (or reuse) the twins, measure, show and write (shared by `reproduce` and the demo).

    ``fresh``: retrain all cached models (True) or those of the norms listed.
    """
    from ..reproduce import LABELS, reproduce

    timer = Timer()
    with ui.make_progress() as progress, timer("train and measure"):
        bars: dict[str, Any] = {}
        phase = progress.add_task("preparing", total=None)

        def on_step(norm: str, step: int, loss: float) -> None:
            if norm not in bars:
                bars[norm] = progress.add_task(f"training {LABELS[norm]}", total=spec.steps)
            progress.update(bars[norm], completed=step, description=f"training {LABELS[norm]} (loss {loss:.2f})")

        result = reproduce(spec, norms, text=text, eval_text=eval_text, eval_tokens=eval_tokens,
                           batch_size=batch_size, threshold=threshold, device=device, fresh=fresh,
                           on_train_step=on_step, on_phase=lambda msg: progress.update(phase, description=msg))
        progress.update(phase, description="done", total=1, completed=1)
    meta = run_record(
        "reproduce", model=None, spec=asdict(spec), norms=norms, train_text=result.train_text,
        eval_text=result.eval_text, eval_tokens=result.eval_tokens, same_tokenizer=result.same_tokenizer,
        settings={"batch_size": batch_size, "threshold": threshold, "device": str(device)},
        models=[{"norm": r.norm, "name": r.name, "path": str(r.path), "placement": r.placement,
                 "train": r.record.get("train")} for r in result.runs],
        summary=result.summary().to_dict(orient="records"), headline=result.headline(),
        timings={**timer.seconds, "total": timer.total()},
    )
    ui.console.print(report.reproduce_table(result, title))
    ui.console.print(report.reproduce_layers_table(result))
    for line in result.headline():
        ui.console.print(line, highlight=False)
    print_files(report.write_reproduce(result, folder, meta))
    return result


# --- compare --------------------------------------------------------------------------------

@app.command("compare")
@command
def compare_cmd(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Result folders (of angular, variance, prune or reproduce), or a model's results/<model> folder.",
        show_default=False)] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="A name per folder, in order "
                                                    "\\[default: the model's name].", show_default=False)] = None,
    bins: Annotated[int | None, typer.Option(help="Slices of relative depth \\[default: the smallest layer "
                                                  "count].", show_default=False)] = None,
    out: CompareOut = None, debug: Debug = False,
) -> None:
    """Several runs side by side: layers aligned by relative depth, overlay plots, a LaTeX table."""
    from ..compare import compare_folders

    if not folders:
        raise UserError("no result folders given: lnsdiag compare FOLDER [FOLDER ...]")
    timer = Timer()
    with timer("load"):
        comparison = compare_folders(folders, label, bins)
    slug = "-vs-".join(model_slug(r.label) for r in comparison.runs)[:120] or "runs"
    folder = output_dir(out, "compare", slug)
    meta = run_record(
        "compare", model=None, bins=comparison.bins,
        runs=[{"label": r.label, "folder": str(r.folder), "num_layers": r.num_layers, "metrics": r.metrics,
               "model": r.meta.get("model")} for r in comparison.runs],
        timings={**timer.seconds, "total": timer.total()},
    )
    for table in report.compare_tables(comparison):
        ui.console.print(table)
    print_files(report.write_compare(comparison, folder, meta))
