"""`lnsdiag lm-eval`: lm-eval's own command line, with the model type ``lnsdiag`` registered.

Every argument goes to lm-eval as it is (``--help`` included): its tasks, output path, samples,
caching, W&B, ... — only ``--model lnsdiag`` is new (:mod:`lnsdiag.scoring.lmeval.model_type`).
A bad ``remove=`` (blocks, sub-layers: ``3.attn``) gets lnsdiag's one ``error:`` line and exit 2;
lm-eval's own argument errors keep lm-eval's usage message (exit 2).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

import typer
from typer.core import TyperCommand

from ..errors import UserError
from . import ui
from .common import _STATE, _exit_for, app

#: What lm-eval's help says about the model type (appended to its epilog).
HELP_NOTE = """
lnsdiag:
  --model lnsdiag --model_args pretrained=ID,remove=3+5+7[,unit=block] plus every HFLM argument
  (revision, dtype, batch_size, trust_remote_code, parallelize, ...). remove= names 0-based blocks
  joined by + and inclusive ranges: remove=3+5+7, remove=20-27, remove=3+20-27 (commas would end
  lm-eval's model_args value); a sub-layer follows its block after a dot: remove=3.attn+5.mlp+7,
  remove=20-27.attn (unit=attn or unit=mlp: a bare number is that sub-layer). They are removed by
  hooks around every forward lm-eval makes; results record them (model_args, config.lnsdiag_removed).
"""


@app.command("lm-eval", cls=TyperCommand, add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             help="lm-eval's own command line, with the model type `lnsdiag` (blocks or sub-layers removed by hooks): "
                  "--model lnsdiag --model_args pretrained=ID,remove=20-27 (or remove=3.attn+5.mlp+7). Every lm-eval "
                  "argument; --help shows lm-eval's.")
def lm_eval_cmd(ctx: typer.Context) -> None:
    try:
        run(list(ctx.args))
    except KeyboardInterrupt:
        ui.err_console.print("[yellow]interrupted[/]", highlight=False)
        raise typer.Exit(130) from None
    except Exception as exc:  # one line, exit 2 for a user error, 1 otherwise (lnsdiag --debug: the traceback)
        _exit_for(exc, _STATE["debug"])


def run(argv: list[str]) -> None:
    """lm-eval's ``cli_evaluate`` on ``argv`` (what follows ``lm-eval`` on its command line)."""
    commas_in_remove(argv)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from ..scoring.lmeval import model_type  # registers "lnsdiag"; imports lm-eval, torch, transformers

    with _argv(["lm-eval", *argv]):
        setup_logging()
        parser = HarnessCLI()
        _add_help_note(parser)
        args = parser.parse_args()
        if getattr(args, "model", None) == model_type.MODEL_TYPE and isinstance(getattr(args, "model_args", None),
                                                                                 dict):
            model_type.check_model_args(args.model_args)  # before lm-eval indexes its tasks (seconds)
        parser.execute(args)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """lm-eval's parser reads ``sys.argv`` itself."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _add_help_note(parser: object) -> None:
    """Say in lm-eval's ``--help`` (the harness's and ``run``'s) how ``--model lnsdiag`` is used."""
    harness = getattr(parser, "_parser", None)
    subparsers = getattr(parser, "_subparsers", None)
    run_parser = getattr(subparsers, "choices", {}).get("run") if subparsers is not None else None
    for each in (harness, run_parser):
        if each is not None:
            each.epilog = (each.epilog or "") + HELP_NOTE


def commas_in_remove(argv: list[str]) -> None:
    """``remove=3,5`` in ``--model_args``: lm-eval would stop at ``5`` with "expected key=value"; say why."""
    for token in argv:
        if token.lstrip().startswith(("{", "-")):
            continue
        parts = token.split(",")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("remove=") and "=" not in parts[i + 1] and re.match(r"^-?\d", parts[i + 1]):
                tail = [p for p in parts[i + 1:] if "=" not in p]
                value = part.removeprefix("remove=")
                raise UserError(f"remove={value},{','.join(tail)}: lm-eval splits model_args at commas; write "
                                f"remove={'+'.join([value, *tail])}")
