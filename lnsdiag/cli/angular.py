"""`lnsdiag angular`: which layers barely turn the residual stream."""

from __future__ import annotations

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


@app.command("angular")
@command
def angular_cmd(
    model: ModelArg = None, model_opt: ModelOpt = None, revision: Revision = None, dtype: Dtype = "auto",
    device: Device = "auto", device_map: DeviceMap = None, trust_remote_code: TrustRemote = False,
    layers_path: LayersPath = None,
    text_file: TextFile = None, text_field: TextField = "text", dataset: Dataset = None,
    dataset_config: DatasetConfig = None, split: Split = None, max_tokens: MaxTokens = 65_536,
    seq_len: SeqLen = None,
    tokens: Annotated[str, typer.Option(help="all: every non-padding token; last: each sequence's last token "
                                             "(Gromov et al., ShortGPT).")] = "all",
    max_block: Annotated[int | None, typer.Option(
        "--max-block", help="Largest block size n for d(x_l, x_{l+n}) \\[default: all layers].",
        show_default=False)] = None,
    threshold: Annotated[float, typer.Option(help="Flag layers below this angular distance.")] = 0.2,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 4,
    out: Out = None, debug: Debug = False,
) -> None:
    """Angular distance between each layer's input and output: which layers are near-identity."""
    name = model_name(model, model_opt)
    if tokens not in ("all", "last"):
        raise UserError(f"--tokens must be all or last, not {tokens!r}")
    folder = output_dir(out, model_slug(name), "angular")
    source = text_source(text_file, dataset, dataset_config, split, text_field)
    timer = Timer()
    with timer("load"):
        loaded = load(name, revision, dtype, device, device_map, trust_remote_code)
    run_angular(loaded, source, folder, timer=timer, layers_path=layers_path, seq_len=seq_len,
                max_tokens=max_tokens, batch_size=batch_size, tokens=tokens, max_block=max_block,
                threshold=threshold)


def run_angular(loaded: LoadedModel, source: Any, folder: Path, *, timer: Timer | None = None,
                layers_path: str | None = None, title: str = "", **settings: Any) -> Any:
    """Measure, show and write the angular table of one model (shared by `angular` and `demo`)."""
    from ..metrics import angular_on_text, default_seq_len
    from ..surgery import find_layers, norm_placement

    timer = timer or Timer()
    stack = find_layers(loaded.model, layers_path)
    settings["seq_len"] = default_seq_len(loaded.model, settings.get("seq_len"))
    with ui.make_progress() as progress, timer("measure"):
        task = progress.add_task("angular distances", total=None)
        result = angular_on_text(
            loaded, source.texts, stack=stack,
            progress=lambda done, total: progress.update(task, completed=done, total=total), **settings)
    meta = run_record(
        "angular", model=loaded.describe(), text=source.name, tokens_used=result.tokens,
        layer_stack=stack.path, num_layers=len(stack), norm_placement=norm_placement(loaded.model, stack),
        settings={**settings, "max_block": int(result.blocks["block_size"].max())},
        timings={**timer.seconds, "total": timer.total()},
    )
    ui.console.print(report.angular_table(result, title or f"Angular distance per layer — {loaded.name}"))
    ui.console.print(report.angular_summary(result))
    print_files(report.write_angular(result, folder, meta, title))
    return result
