"""What every command shares: the Typer app, common options, error handling, loading."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup
from typer.models import OptionInfo
from typer.utils import get_params_from_function

from .. import distributed, report
from ..data.text import TextOptions, TextSource
from ..errors import Interrupted, OptionError, UserError
from ..model.load import LoadedModel, ModelOptions, hub_offline, shadowed_alias
from ..runs import discard_empty_outputs
from . import ui


class _Strict:
    """Refuse, before any option is converted, what the parser would silently resolve: an option given
    twice that keeps only one value (``--out a --out b``), and an empty value that names nothing
    (``--out ""``, ``--tasks ""``). One ``error:`` line and exit 2, as for every user error."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing and args:
            try:
                opts, _, order = self.make_parser(ctx).parse_args(args=list(args))  # type: ignore[attr-defined]
            except Exception:  # a malformed line: the parser proper says what is wrong
                opts, order = {}, []
            try:
                _check_given(opts, order)
            except UserError as exc:
                _exit_for(exc, _STATE["debug"] or "--debug" in args)
        return super().parse_args(ctx, args)  # type: ignore[misc]


def _check_given(opts: dict[str, Any], order: list[Any]) -> None:
    seen: set[str] = set()
    for param in order:
        if not getattr(param, "expose_value", True) or param.name in seen:
            continue
        seen.add(param.name)
        is_option = param.param_type_name == "option"
        flag = _flag(param) if is_option else (param.metavar or param.name or "").upper()
        times = sum(1 for p in order if p is param)
        if is_option and times > 1 and not param.multiple and not getattr(param, "count", False):
            raise UserError(f"{flag} given {_times(times)}: give it once")
        value = opts.get(param.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise UserError(f"{flag} is empty: give it a value, or leave it out" if is_option
                            else f"the {flag} argument is empty")


def _flag(param: Any) -> str:
    """An option as the user knows it: its first long name (``--out``), else its first name."""
    return next((o for o in param.opts if o.startswith("--")), param.opts[0])


def _times(n: int) -> str:
    return {2: "twice", 3: "three times"}.get(n, f"{n} times")


class StrictCommand(_Strict, TyperCommand):
    """Every lnsdiag command: see :class:`_Strict`."""


class StrictGroup(_Strict, TyperGroup):
    """The ``lnsdiag`` group itself (``--debug``): see :class:`_Strict`."""


class _App(typer.Typer):
    """Typer whose commands are :class:`StrictCommand` unless told otherwise: one place for all of them."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or StrictCommand, **kwargs)


app = _App(
    cls=StrictGroup,
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
Quantize = Annotated[str | None, typer.Option(
    "--quantize", help="Load the blocks' linear layers quantized: 8bit (LLM.int8) or 4bit (NF4), by bitsandbytes "
    "(pip install bitsandbytes), on the CPU or a GPU, for models larger than memory. Not with --save or export.",
    show_default=False)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Spread a model over devices (e.g. auto) for models larger than one GPU.",
    show_default=False)]
GpusPerReplica = Annotated[int, typer.Option(
    "--gpus-per-replica", help="Under torchrun: GPUs each rank's replica is spread over (ranks per node × K = the "
    "node's GPUs), for a model larger than one GPU.")]
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
Unit = Annotated[str, typer.Option(
    "--unit", help="What to measure, comma-separated: block (each whole block), attn, mlp (each block's "
    "attention / MLP sub-layer: its own step of the residual stream).")]
SeqLen = Annotated[int | None, typer.Option(
    "--seq-len", help="Tokens per sequence \\[default: min(2048, context length)].", show_default=False)]


def command(fn: F) -> F:
    """Run a command with one-line errors (tracebacks only with --debug); under a launcher
    (torchrun), join the process group first and leave it on the way out."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = _STATE["debug"] or bool(kwargs.get("debug"))
        ui.quiet_libraries(debug)
        failed = True
        try:
            distributed.init_from_env(gpus_per_replica=int(kwargs.get("gpus_per_replica") or 1))
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                result = fn(*args, **kwargs)
            failed = False
            return result
        except BaseException as exc:
            if distributed.is_main():
                discard_empty_outputs()  # a failed command leaves no empty --out folder behind
            _exit_for(exc, debug, fn)
        finally:
            _leave_group(failed)

    return wrapper  # type: ignore[return-value]


def _leave_group(failed: bool) -> None:
    """destroy_process_group, never letting a broken group turn an exit into a hang or a traceback:
    after a failure only on gloo (NCCL's teardown may wait on the collectives a dead rank never
    joins; the process exits anyway and torchrun stops the others)."""
    with contextlib.suppress(Exception):  # a group a failed rank broke: nothing left to do
        if not failed or distributed.backend() != "nccl":
            distributed.shutdown()


def _rank_tag() -> str:
    """``rank 3: `` before a line on stderr when several ranks print."""
    here = distributed.world()
    return f"rank {here.rank}: " if here.parallel else ""


def _exit_for(exc: BaseException, debug: bool, fn: Callable[..., Any] | None = None) -> typing.NoReturn:
    """One line and an exit code for what a command raised: 2 user error, 130 interrupt, 1 bug."""
    if isinstance(exc, (typer.Exit, typer.Abort, SystemExit)):
        raise exc
    tag = _rank_tag()
    if isinstance(exc, KeyboardInterrupt):
        said = str(exc) if isinstance(exc, Interrupted) else "finished results are saved; rerun to resume."
        if distributed.is_main():
            ui.err_console.print(f"{tag}[yellow]interrupted[/]: {said}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if isinstance(exc, distributed.MirroredError):  # rank 0's error: rank 0 says it
        raise typer.Exit(2) from None
    if debug or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, UserError):
        ui.err_console.print(f"{tag}[bold red]error:[/] {escape(user_message(exc, fn))}", highlight=False,
                             soft_wrap=True)  # escaped: a message's [brackets] (lnsdiag[quantize]) are text
        raise typer.Exit(2) from None
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    ui.err_console.print(f"{tag}[bold red]error:[/] {type(exc).__name__}: {first} (rerun with --debug for the "
                         "traceback)", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def user_message(exc: UserError, command_fn: Callable[..., Any] | None) -> str:
    """A user error as the command line says it: the config fields an :class:`OptionError` names shown
    as the flags of ``command_fn`` that set them (``layers`` as ``--layers``; no command: as fields)."""
    if not isinstance(exc, OptionError) or command_fn is None:
        return str(exc)
    flags = option_flags(command_fn)
    return exc.render(lambda field: flags.get(field, field))


def option_flags(command_fn: Callable[..., Any]) -> dict[str, str]:
    """A command's options as Typer reads them: parameter name -> long flag. Parameters are named as the
    config fields they set (``rank_by``, shown ``--rank-by``), so this is the field -> flag table."""
    flags = {}
    for name, param in get_params_from_function(command_fn).items():
        if isinstance(param.default, OptionInfo):
            declared = [d.split("/")[0] for d in param.default.param_decls or () if d.startswith("--")]
            flags[name] = declared[0] if declared else "--" + name.replace("_", "-")
    return flags


@app.callback()
def _root(debug: Debug = False) -> None:
    """Diagnose which layers of an LLM are dead weight, and why (Pre-LN variance growth)."""
    _STATE["debug"] = debug


#: The shared model options, in the order --help lists them: (parameter, Typer annotation, default).
_MODEL_PARAMS = (
    ("model", ModelArg, None), ("model_opt", ModelOpt, None), ("revision", Revision, None), ("dtype", Dtype, "auto"),
    ("quantize", Quantize, None), ("device", Device, "auto"), ("device_map", DeviceMap, None),
    ("trust_remote_code", TrustRemote, False), ("layers_path", LayersPath, None),
    ("gpus_per_replica", GpusPerReplica, 1),
)
#: The shared text options of the measuring commands.
_TEXT_PARAMS = (
    ("text_file", TextFile, None), ("text_field", TextField, "text"), ("dataset", Dataset, None),
    ("dataset_config", DatasetConfig, None), ("split", Split, None),
)


def _shared_options(params: tuple, key: str, build: Callable[..., Any]) -> Callable[[F], F]:
    """A decorator giving a command the options ``params``, which reach it as one object
    ``key = build(**values)``.

    Typer reads a command's parameters from its signature, so the wrapper's signature is the
    shared options followed by the command's own parameters (``key`` removed).
    """

    def decorate(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != key]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
                  for name, ann, default in params]
        hints = typing.get_type_hints(fn, include_extras=True)

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name, _, _ in params}
            return fn(**{key: build(**values)}, **kwargs)

        wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*shared, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                        for p in own)])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        del wrapper.__wrapped__  # Typer must read the new signature, not fn's
        return wrapper  # type: ignore[return-value]

    return decorate


def model_choice(model: str | None, model_opt: str | None, **options: Any) -> ModelOptions:
    """MODEL or --model (not two different ones), checked before any output is created."""
    if model and model_opt and model != model_opt:
        raise UserError(f"two models given ({model!r} and --model {model_opt!r}); pass one")
    name = model or model_opt
    if not name:
        raise UserError("no model given: lnsdiag COMMAND MODEL (a hub id, local directory or alias)")
    return ModelOptions(name, **options)


#: Model options (MODEL, --revision, --dtype, ...) as one ``model: ModelOptions`` parameter.
model_options = _shared_options(_MODEL_PARAMS, "model", model_choice)
def text_choice(text_file: Path | None = None, text_field: str = "text", dataset: str | None = None,
                dataset_config: str | None = None, split: str | None = None) -> TextOptions:
    """The text options, refusing those that would be silently ignored: a file and a dataset, a
    dataset's config or split with a file, a config without its dataset (the default has its own)."""
    if text_file is not None and dataset is not None:
        raise OptionError("give {text_file} or {dataset}, not both")
    if text_file is not None and (dataset_config is not None or split is not None):
        raise OptionError("{named} a dataset, not to {text_file}: drop it or give {dataset} instead of {text_file}",
                          named="--dataset-config applies to" if dataset_config is not None else "--split applies to")
    if dataset_config is not None and dataset is None:
        raise OptionError("{dataset_config} needs {dataset} (the default text has its own config)")
    return TextOptions(text_file, text_field, dataset, dataset_config, split)


#: Text options (--text-file, --dataset, ...) as one ``text: TextOptions`` parameter.
text_options = _shared_options(_TEXT_PARAMS, "text", text_choice)


def load(options: ModelOptions) -> LoadedModel:
    """Load with a spinner, saying once when the hub is unreachable."""
    if not options.is_local:
        offline_note()
    elif note := shadowed_alias(options.name):
        ui.note(note)
    with ui.status(f"loading {options.name}"):
        return options.load()


def offline_note() -> None:
    """Say once when the hub is unreachable and we work from the local cache."""
    already = "HF_HUB_OFFLINE" in os.environ
    if hub_offline() and not already:
        ui.note("huggingface.co is unreachable: working offline from the local cache (HF_HOME)")


def text_source(options: TextOptions) -> TextSource:
    """The chosen text, saying so when it falls back to the built-in corpus (offline)."""
    return options.resolve(note=ui.note)


def print_files(files: list[Path]) -> None:
    ui.console.print(report.files_table(files))

