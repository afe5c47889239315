"""The one measuring loop: the residual stream at every depth, batch by batch.

x_i is the input of block i (0-based) and x_{i+1} its output; x_L is the last block's output
*before* the final norm (``output_hidden_states`` would give the post-norm state there).
Statistics run over non-padding tokens (``tokens="all"``) or each sequence's last real
token (``tokens="last"``, as in Gromov et al. and ShortGPT), accumulated batch by batch so
memory stays bounded whatever the length of the text. Angular distances and residual
variance are both accumulators fed by :func:`stream_states`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from ..data.windows import TokenWindows, check_batch_size, check_seq_len, default_seq_len
from ..distributed import all_gather, my_share, world
from ..errors import UserError
from ..interventions.units import parse_kinds
from ..model.patch import patched
from ..model.placement import norm_placement
from ..model.structure import LayerStack, block_input, find_layers, first_tensor, no_cache_kwargs
from ..progress import SILENT, Progress
from ..runs import Timer, run_record

if TYPE_CHECKING:
    from ..data.text import TextSource
    from ..model.load import LoadedModel

TokenMode = Literal["all", "last"]
TOKEN_MODES: tuple[str, ...] = ("all", "last")
_Config = TypeVar("_Config", bound="StreamConfig")
_Part = TypeVar("_Part")


def check_tokens(tokens: str) -> TokenMode:
    """``tokens`` if it names a token selection (``all`` or ``last``), else a UserError."""
    if tokens not in TOKEN_MODES:
        raise UserError(f"--tokens must be all or last, not {tokens!r}")
    return tokens  # type: ignore[return-value]


@dataclass(frozen=True)
class StreamConfig:
    """How a text goes through the model: window length, how much of it, batch size, which tokens,
    and which units are measured.

    Checked when built, so a command fails on a bad option before it creates any output.
    ``seq_len=None`` is the model's context length (capped at 2048), checked against the
    model when it is known; ``max_tokens=None`` takes the whole text. ``units`` (``--unit``) are
    the kinds of unit whose rows the results hold: ``block`` (each whole block), ``attn`` and
    ``mlp`` (each block's sub-layers, :mod:`.sublayers`); given as ``"attn,mlp"`` or a sequence,
    kept as :func:`~lnsdiag.interventions.units.parse_kinds` orders them.
    """

    seq_len: int | None = None
    max_tokens: int | None = 65_536
    batch_size: int = 4
    tokens: TokenMode = "all"
    units: tuple[str, ...] = ("block",)

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        object.__setattr__(self, "units", parse_kinds(self.units))
        if self.seq_len is not None:
            check_seq_len(self.seq_len)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, not {self.max_tokens}")
        check_batch_size(self.batch_size)

    def for_model(self: _Config, model: torch.nn.Module) -> _Config:
        """This config with ``seq_len`` resolved (and checked) for ``model``."""
        return replace(self, seq_len=default_seq_len(model, self.seq_len))

    def windows(self, loaded: LoadedModel, texts: Iterable[str], name: str = "text") -> TokenWindows:
        """The text as token windows for a :class:`~lnsdiag.models.LoadedModel`."""
        seq_len = default_seq_len(loaded.model, self.seq_len)
        return TokenWindows.of(loaded.tokenizer, texts, seq_len=seq_len, max_tokens=self.max_tokens, name=name)


class _StopForward(Exception):
    """Raised after the last block: the final norm and LM head are not needed."""


def pick_tokens(hidden: torch.Tensor, mask: torch.Tensor, tokens: TokenMode) -> torch.Tensor:
    """The states of real tokens: all of them, or each row's last (left or right padding alike)."""
    mask = mask.to(hidden.device).bool()
    if tokens == "all":
        return hidden[mask]
    positions = torch.arange(mask.shape[1], device=hidden.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def angle_and_cosine(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of two unit vectors: their angle (radians) and their cosine (clamped to [-1, 1]).

    arccos is ill-conditioned near cos = 1 (exactly where near-identity layers are);
    2·atan2(|u−v|, |u+v|) is the same angle, accurate for small angles too."""
    cosine = (u * v).sum(dim=-1).clamp(-1.0, 1.0)
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)), cosine


def stream_states(
    model: torch.nn.Module,
    stack: LayerStack,
    ids: torch.Tensor,
    mask: torch.Tensor,
    on_state: Callable[[int, torch.Tensor], None],
    tokens: TokenMode = "all",
) -> None:
    """Run one batch and hand x_0..x_L (selected tokens, shape ``[n, hidden]``) to ``on_state``."""
    last = len(stack) - 1

    def before(index: int):
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            on_state(index, pick_tokens(block_input(args, kwargs), mask, tokens))
        return hook

    def after_last(_m: Any, _a: tuple, out: Any) -> None:
        on_state(last + 1, pick_tokens(first_tensor(out), mask, tokens))
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    with patched() as patches:
        for i, layer in enumerate(stack.layers):
            patches.pre_hook(layer, before(i), with_kwargs=True)
        patches.hook(stack.layers[last], after_last)
        try:
            with torch.no_grad():
                model(input_ids=ids.to(device), attention_mask=mask.to(device), **no_cache_kwargs(model))
        except _StopForward:
            pass


def measure_batches(windows: TokenWindows, batch_size: int, measure: Callable[[torch.Tensor, torch.Tensor], _Part],
                    progress: Progress = SILENT, phase: str = "measuring") -> list[_Part]:
    """``measure(ids, mask)`` of every batch of the windows, in batch order.

    Under a launcher each rank measures a share of the batches (balanced by padded tokens)
    and every rank gets every batch's part, so a caller that combines the parts in this order
    gets bitwise what one process gets. Rank 0's progress counts windows: its own, scaled to
    the job's.
    """
    batches = list(windows.batches(batch_size))
    mine = my_share([ids.numel() for ids, _ in batches])
    parallel = world().parallel
    scale = len(windows) / max(1, sum(batches[k][0].shape[0] for k in mine)) if parallel else 1
    progress.phase(phase, total=len(windows))
    parts: dict[int, _Part] = {}
    for k in mine:
        ids, mask = batches[k]
        parts[k] = measure(ids, mask)
        progress.advance(ids.shape[0] * scale)
    if parallel:
        parts = {k: part for gathered in all_gather(parts) for k, part in gathered.items()}
        if not mine:
            progress.advance(len(windows))
    return [parts[k] for k in range(len(batches))]


@dataclass(frozen=True)
class MeasureRun:
    """A measurement run (``angular``, ``variance``): its result and the JSON record of how it
    was made (``meta.json``)."""

    result: Any
    meta: dict[str, Any]

    @property
    def model_name(self) -> str:
        return str((self.meta.get("model") or {}).get("name", "model"))

    @property
    def placement(self) -> str:
        """Where the model normalises (``pre-LN``, ``pre-LN+LNS``, ...)."""
        return str(self.meta.get("norm_placement", ""))


def recorded_settings(config: StreamConfig) -> dict[str, Any]:
    """The config as meta.json records it: ``units`` only when it asks for more than the whole blocks,
    so a block-only run's record is what it always was."""
    settings = asdict(config)
    if config.units == ("block",):
        del settings["units"]
    else:
        settings["units"] = list(config.units)
    return settings


def measure_text(command: str, loaded: LoadedModel, text: TextSource, config: StreamConfig,
                 measure: Callable[..., Any], *, layers_path: str | None = None, progress: Progress = SILENT,
                 timer: Timer | None = None, settings: Callable[[Any], dict[str, Any]] | None = None
                 ) -> tuple[Any, dict[str, Any]]:
    """Run ``measure(model, windows, config, stack=, progress=)`` over ``text`` and build the run's
    record: what ``angular.run`` and ``variance.run`` share. ``settings(result)`` adds to the
    recorded config."""
    timer = timer or Timer()
    stack = find_layers(loaded.model, layers_path)
    config = config.for_model(loaded.model)
    placement = norm_placement(loaded.model, stack)
    with timer("measure"):
        result = measure(loaded.model, config.windows(loaded, text.texts, text.name), config, stack=stack,
                         progress=progress)
    meta = run_record(
        command, model=loaded.describe(), text=text.name, tokens_used=result.tokens, layer_stack=stack.path,
        num_layers=len(stack), norm_placement=placement,
        settings={**recorded_settings(config), **(settings(result) if settings else {})},
        timings={**timer.seconds, "total": timer.total()},
    )
    return result, meta
