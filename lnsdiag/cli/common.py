"""What every command shares: the Typer app, common options, error handling, loading."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .. import report, ui
from ..errors import UserError
from ..models import LoadedModel, hub_offline, load_model, resolve_model

app = typer.Typer(
    name="lnsdiag",
    help="Find the dead weight in large language models (The Curse of Depth, arXiv 2502.05795).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])

# --- options shared by every model command ------------------------------------------------

ModelArg = Annotated[str | None, typer.Argument(
    help="Hub id (meta-llama/Llama-2-7b-hf), local directory, or alias (see `lnsdiag models`).",
    show_default=False)]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Same as the MODEL argument.",
                                              show_default=False)]
Revision = Annotated[str | None, typer.Option(help="Hub branch, tag or commit.", show_default=False)]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Spread a model over devices (e.g. auto) for models larger than one GPU.",
    show_default=False)]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Run the checkpoint's own code.")]
LayersPath = Annotated[str | None, typer.Option(
    "--layers-path", help="Dotted path of the block list (e.g. model.layers) if discovery fails.",
    show_default=False)]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder \\[default: results/<model>/<command>].",
                                          show_default=False)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")]
# text options (angular, variance, prune --ppl-*)
TextFile = Annotated[Path | None, typer.Option(
    "--text-file", help="Plain text, or JSON Lines with a text field.", show_default=False)]
TextField = Annotated[str, typer.Option("--text-field", help="Field of JSONL records holding the text.")]
Dataset = Annotated[str | None, typer.Option(
    "--dataset", help="A `datasets` name, or `stdlib` for the built-in corpus \\[default: wikitext-2 raw, test; "
    "the stdlib corpus when offline].", show_default=False)]
DatasetConfig = Annotated[str | None, typer.Option("--dataset-config", show_default=False)]
Split = Annotated[str | None, typer.Option("--split", help="Dataset split \\[default: test].", show_default=False)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Tokens to average over (the paper used 256K).")]
SeqLen = Annotated[int | None, typer.Option(
    "--seq-len", help="Tokens per sequence \\[default: min(2048, context length)].", show_default=False)]


def command(fn: F) -> F:
    """Run a command with one-line errors (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = _STATE["debug"] or bool(kwargs.get("debug"))
        ui.quiet_libraries(debug)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except UserError as exc:
            if debug:
                raise
            ui.err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            ui.err_console.print("[yellow]interrupted[/]: finished results are saved; rerun to resume.")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            ui.err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {first} (rerun with --debug for the "
                                 "traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _root(debug: Debug = False) -> None:
    """Diagnose which layers of an LLM are dead weight, and why (Pre-LN variance growth)."""
    _STATE["debug"] = debug


def model_name(model: str | None, model_opt: str | None) -> str:
    if model and model_opt and model != model_opt:
        raise UserError(f"two models given ({model!r} and --model {model_opt!r}); pass one")
    name = model or model_opt
    if not name:
        raise UserError("no model given: lnsdiag COMMAND MODEL (a hub id, local directory or alias)")
    resolve_model(name)  # a malformed id or missing directory fails here, before any slow work
    return name


def load(name: str, revision: str | None, dtype: str, device: str, device_map: str | None,
          trust_remote_code: bool) -> LoadedModel:
    _, is_local = resolve_model(name)
    if not is_local:
        offline_note()
    with ui.status(f"loading {name}"):
        return load_model(name, revision=revision, dtype=dtype, device=device, device_map=device_map,
                          trust_remote_code=trust_remote_code)


def offline_note() -> None:
    """Say once when the hub is unreachable and we work from the local cache."""
    already = "HF_HUB_OFFLINE" in os.environ
    if hub_offline() and not already:
        ui.note("huggingface.co is unreachable: working offline from the local cache (HF_HOME)")


def text_source(text_file: Path | None, dataset: str | None, dataset_config: str | None, split: str | None,
                 field: str):
    from ..text import resolve_text

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = resolve_text(text_file, dataset, dataset_config, split, field)
    for w in caught:
        if issubclass(w.category, UserWarning):
            ui.note(str(w.message))
    return source


def print_files(files: list[Path]) -> None:
    ui.console.print(report.files_table(files))
