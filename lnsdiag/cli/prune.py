"""`lnsdiag prune`: remove each layer in turn, score every variant, say which are dead weight."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import report, ui
from ..errors import UserError
from ..models import LoadedModel, model_slug
from ..runs import Timer, output_dir, read_json, run_record
from .common import (
    Debug,
    Device,
    DeviceMap,
    Dtype,
    LayersPath,
    ModelArg,
    ModelOpt,
    Out,
    Revision,
    SeqLen,
    TrustRemote,
    app,
    command,
    load,
    model_name,
    print_files,
    text_source,
)

Tasks = Annotated[str | None, typer.Option(
    "--tasks", "-t", help="lm-eval task or group names, comma-separated \\[default: mmlu, unless only --ppl-* "
    "is given].", show_default=False)]


@app.command("prune")
@command
def prune_cmd(
    model: ModelArg = None, model_opt: ModelOpt = None, revision: Revision = None, dtype: Dtype = "auto",
    device: Device = "auto", device_map: DeviceMap = None, trust_remote_code: TrustRemote = False,
    layers_path: LayersPath = None,
    tasks: Tasks = None,
    include_path: Annotated[Path | None, typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs.",
                                                      show_default=False)] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples \\[default: the "
                                                    "task's own].", show_default=False)] = None,
    limit: Annotated[str | None, typer.Option(help="Documents per task: a count (100) or a fraction (0.1).",
                                              show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling and lm-eval.")] = 1234,
    bootstrap_iters: Annotated[int, typer.Option("--bootstrap-iters", help="lm-eval's bootstrap for stderr of "
                                                 "non-mean metrics.")] = 100_000,
    ppl_text: Annotated[Path | None, typer.Option("--ppl-text", help="Also score built-in perplexity on this "
                                                  "text (plain or JSONL).", show_default=False)] = None,
    ppl_dataset: Annotated[str | None, typer.Option("--ppl-dataset", help="Built-in perplexity on a `datasets` "
                                                    "dataset (or `stdlib`).", show_default=False)] = None,
    ppl_dataset_config: Annotated[str | None, typer.Option("--ppl-dataset-config", show_default=False)] = None,
    ppl_split: Annotated[str | None, typer.Option("--ppl-split", show_default=False)] = None,
    ppl_field: Annotated[str, typer.Option("--ppl-field", help="Field of JSONL records holding the text.")] = "text",
    ppl_max_tokens: Annotated[int, typer.Option("--ppl-max-tokens", help="Tokens of perplexity text.")] = 65_536,
    seq_len: SeqLen = None,
    layers: Annotated[str, typer.Option("--layers", "-l", help="Layers to remove, one at a time: 0-31, 0,4,8, "
                                        "28- or all.")] = "all",
    no_angular: Annotated[bool, typer.Option("--no-angular", help="Skip the angular distances.")] = False,
    tolerance: Annotated[float, typer.Option(help="Dead weight if |Δ| ≤ max(tolerance, 2 × stderr).")] = 0.01,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size for lm-eval and perplexity.")] = 8,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard stored results in --out and start over.")] = False,
    engine: Annotated[str, typer.Option(help="fast: all variants from one pass over the requests; naive: one "
                                        "lm-eval run per variant (the reference).")] = "fast",
    batch_tokens: Annotated[int | None, typer.Option("--batch-tokens", help="Fast engine: tokens per batch "
                                                     "\\[default: from free GPU memory; 8192 on CPU].",
                                                     show_default=False)] = None,
    out: Out = None, debug: Debug = False,
) -> None:
    """Remove each layer in turn, score every variant, and show which layers are dead weight."""
    from ..scoring import load_tasks, parse_limit

    name = model_name(model, model_opt)
    folder = output_dir(out, model_slug(name), "prune")
    limit_value = parse_limit(limit)
    if ppl_text is not None and ppl_dataset is not None:
        raise UserError("give --ppl-text or --ppl-dataset, not both")
    wants_ppl = ppl_text is not None or ppl_dataset is not None
    task_names = [t for t in (tasks.split(",") if tasks else ([] if wants_ppl else ["mmlu"])) if t.strip()]
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if engine not in ("fast", "naive"):
        raise UserError(f"--engine must be fast or naive, not {engine!r}")
    if batch_tokens is not None and batch_tokens < 1:
        raise UserError(f"--batch-tokens must be positive, not {batch_tokens}")
    timer = Timer()
    taskset = None
    if task_names:
        with ui.status(f"loading tasks {', '.join(task_names)}"), timer("tasks"):
            taskset = load_tasks(task_names, include_path, num_fewshot)
    ppl_source = None
    if wants_ppl:
        from ..text import from_dataset, from_file

        ppl_source = (from_file(ppl_text, ppl_field) if ppl_text is not None
                      else from_dataset(ppl_dataset, ppl_dataset_config, ppl_split or "test", ppl_field))
    with timer("load"):
        loaded = load(name, revision, dtype, device, device_map, trust_remote_code)
    run_prune(loaded, folder, taskset=taskset, ppl_source=ppl_source, timer=timer, layers=layers,
              layers_path=layers_path, limit=limit_value, seed=seed, bootstrap_iters=bootstrap_iters,
              ppl_max_tokens=ppl_max_tokens, seq_len=seq_len, angular=not no_angular, tolerance=tolerance,
              batch_size=batch_size, fresh=fresh, engine=engine, batch_tokens=batch_tokens)


def run_prune(loaded: LoadedModel, folder: Path, *, taskset: Any = None, ppl_source: Any = None,
              timer: Timer | None = None, layers: str = "all", layers_path: str | None = None,
              limit: int | float | None = None, seed: int = 1234, bootstrap_iters: int = 100_000,
              ppl_max_tokens: int = 65_536, seq_len: int | None = None, angular: bool = True,
              angular_source: Any = None, angular_frame: Any = None, tolerance: float = 0.01, batch_size: int = 8,
              fresh: bool = False, engine: str = "fast", batch_tokens: int | None = None,
              title: str = "") -> Any:
    """Sweep, show and write one model's layer-removal results (shared by `prune` and `demo`)."""
    from ..metrics import default_seq_len
    from ..scoring import PPL_TASK, Scorer
    from ..surgery import find_layers, norm_placement, parse_layer_spec
    from ..sweep import ResultStore, plan_variants, prune_frame, run_fast, run_naive
    from ..text import token_windows

    if engine not in ("fast", "naive"):
        raise UserError(f"--engine must be fast or naive, not {engine!r}")
    timer = timer or Timer()
    stack = find_layers(loaded.model, layers_path)
    selected = parse_layer_spec(layers, len(stack))
    windows = None
    settings: dict[str, Any] = {
        "model": loaded.source, "revision": loaded.revision, "weights": loaded.weights_identity(),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "task_versions": taskset.describe()["versions"] if taskset else None,
        "tasks": taskset.names if taskset else [], "include_path": taskset.include_path if taskset else None,
        "num_fewshot": taskset.num_fewshot if taskset else None, "limit": limit, "seed": seed,
        "bootstrap_iters": bootstrap_iters, "layers_path": stack.path, "ppl_text": None, "ppl_max_tokens": None,
        "seq_len": None, "softmax_dtype": "float32",
    }
    if ppl_source is not None:
        seq = default_seq_len(loaded.model, seq_len)
        windows = token_windows(loaded.tokenizer, ppl_source.texts, seq_len=seq, max_tokens=ppl_max_tokens)
        digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in windows)).hexdigest()[:16]
        settings.update(ppl_text=f"{ppl_source.name}#{digest}", ppl_max_tokens=ppl_max_tokens, seq_len=seq)
    scorer = Scorer(loaded, taskset, ppl_windows=windows, limit=limit, seed=seed,
                    bootstrap_iters=bootstrap_iters, batch_size=batch_size)
    settings["max_length"] = scorer.lm.max_length if scorer.lm is not None else None
    store = ResultStore(folder, settings, fresh=fresh)
    done = store.done()
    todo = plan_variants(selected, done)
    if done and todo:
        ui.note(f"resuming: {len(done)} variant(s) already in {folder}, {len(todo)} to go")
    elif done and not todo:
        ui.note(f"all {len(selected) + 1} variants are already in {folder} (use --fresh to redo them)")

    if angular and angular_frame is None:
        angular_frame = _angular_for_prune(loaded, folder, stack, angular_source or ppl_source, settings, timer,
                                           batch_size)
    shown = (taskset.names if taskset else []) + ([PPL_TASK] if windows else [])
    meta_fields = {"settings": settings, "tasks": taskset.describe() if taskset else None,
                   "ppl_text": ppl_source.name if ppl_source else None, "layer_stack": stack.path,
                   "num_layers": len(stack), "layers": selected, "tolerance": tolerance,
                   "dead_rule": report.rule_text(tolerance), "norm_placement": norm_placement(loaded.model, stack)}

    engine_info: dict[str, Any] = {"engine": engine}

    def current_frame() -> Any:
        frame = prune_frame(store.done(), tolerance=tolerance, angular=angular_frame)
        return frame[frame["removed_layer"].isna() | frame["removed_layer"].isin(selected)].reset_index(drop=True)

    def write(plots: bool) -> list[Path]:
        results = store.done()
        if None not in results:
            return []
        timings = {**timer.seconds, "variants": {str(k if k is not None else "baseline"): v.seconds
                                                 for k, v in sorted(results.items(), key=lambda kv: -1
                                                                    if kv[0] is None else kv[0])}}
        engines = sorted({v.engine for k, v in results.items() if k is None or k in selected})
        meta = run_record("prune", model=loaded.describe(), **meta_fields, **engine_info, variant_engines=engines,
                          variants_done=len(results), timings=timings)
        return report.write_prune(current_frame(), shown, folder, meta, plots=plots, title=title)

    with ui.make_progress() as progress:
        bar = progress.add_task("variants", total=len(todo))

        def on_start(layer: int | None) -> None:
            progress.update(bar, description="baseline" if layer is None else f"without layer {layer}")

        def on_done(result: Any) -> None:
            progress.advance(bar)
            write(plots=False)

        try:
            with timer("sweep"):
                if engine == "naive" or not todo:
                    run_naive(scorer, todo, stack, store, on_start=on_start, on_done=on_done)
                else:
                    passes = progress.add_task("one pass, all variants", total=None)
                    progress.update(bar, description="aggregating")
                    engine_info["engine_stats"] = run_fast(
                        scorer, todo, stack, store, batch_tokens=batch_tokens, on_done=on_done,
                        on_phase=lambda msg: progress.update(passes, description=msg),
                        on_progress=lambda done_, total: progress.update(passes, completed=done_, total=total))
        except KeyboardInterrupt:
            progress.stop()
            saved = sum(1 for k in store.done() if k is None or k in selected)
            ui.err_console.print(f"[yellow]interrupted[/]: {saved} of {len(selected) + 1} variants are saved in "
                                 f"{folder}; rerun the same command to resume.")
            raise typer.Exit(130) from None
    frame = current_frame()
    if engine_info.get("engine_stats", {}).get("naive_tasks"):
        ui.note(f"generation tasks ({', '.join(engine_info['engine_stats']['naive_tasks'])}) were scored by the "
                "naive engine: they need the model to generate, not just log-likelihoods")
    ui.console.print(report.prune_table(frame, shown, title or f"Layer removal — {loaded.name}"))
    for line in report.prune_summary(frame, shown, tolerance):
        ui.console.print(line)
    ui.console.print(f"[dim]{report.rule_text(tolerance)}[/dim]")
    print_files(write(plots=True))
    return frame


def _angular_for_prune(loaded: LoadedModel, folder: Path, stack: Any, source: Any, settings: dict[str, Any],
                       timer: Timer, batch_size: int) -> Any:
    """Angular distances for the table's last column; reused from a previous run of the same sweep."""
    import pandas as pd

    from ..metrics import angular_on_text
    from ..runs import write_csv, write_json

    path, stamp = folder / "angular.csv", folder / "angular_settings.json"
    if path.is_file() and stamp.is_file() and read_json(stamp) == settings:
        return pd.read_csv(path)
    if source is None:
        source = text_source(None, None, None, None, "text")
    with ui.make_progress(transient=True) as progress, timer("angular"):
        task = progress.add_task("angular distances", total=None)
        result = angular_on_text(loaded, source.texts, stack=stack, max_block=1, batch_size=batch_size,
                                 seq_len=settings.get("seq_len"), max_tokens=settings.get("ppl_max_tokens") or 65_536,
                                 progress=lambda d, t: progress.update(task, completed=d, total=t))
    write_csv(path, result.layers)
    write_json(stamp, settings)
    return result.layers
