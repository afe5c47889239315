"""Angular distances measured for a run and kept in its folder, reused while the settings match.

``prune`` shows each layer's angular distance next to its removal; ``shrink``'s angular and bi
strategies choose from the block distances. Both measure on the same tokens as the run scores
(or on a text given for it), store the table with a stamp of the settings that made it
(``angular_settings.json``), and on a rerun read it back instead of measuring again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ..data.text import TextSource, resolve_text
from ..data.windows import TokenWindows, default_seq_len
from ..distributed import on_main
from ..measure.angular import AngularConfig, angular_on_windows
from ..model.load import LoadedModel
from ..model.structure import LayerStack
from ..progress import SILENT, Progress
from ..runs import read_json, write_csv, write_json
from .scoring import Scoring

#: The file a table is kept in: ``layers`` one row per layer (n = 1), ``blocks`` one per block of n ≤ max_block.
FILES = {"layers": "angular.csv", "blocks": "angular_blocks.csv"}
STAMP = "angular_settings.json"


@dataclass(frozen=True)
class AngularCache:
    """Which table is kept in ``folder``, measured up to blocks of ``max_block`` layers, and the
    settings it must have been made with to be reused."""

    folder: Path
    table: Literal["layers", "blocks"]
    stamp: Mapping[str, Any]
    max_block: int = 1
    #: the unit kinds of the ``layers`` table (``attn``, ``mlp``: each sub-layer's own step, a ``unit`` column)
    units: tuple[str, ...] = ("block",)

    @property
    def settings(self) -> dict[str, Any]:
        """What the stored table must have been made with: the run's stamp, and its unit kinds beyond blocks."""
        return {**self.stamp, "units": list(self.units)} if self.units != ("block",) else dict(self.stamp)

    @property
    def path(self) -> Path:
        return self.folder / FILES[self.table]

    def stored(self) -> bool:
        """Whether the folder holds the table, made with these settings (rank 0 looks; every rank hears)."""
        stamp = self.folder / STAMP

        def matches() -> bool:
            try:
                return self.path.is_file() and read_json(stamp) == self.settings
            except (OSError, ValueError):  # no stamp, or a damaged one: measured again, never trusted
                return False

        return on_main(matches)

    def save(self, frame: pd.DataFrame) -> None:
        """The table and its stamp, written by one rank (every rank measured the same gathered sums)."""
        def write() -> None:
            write_csv(self.path, frame)
            write_json(self.folder / STAMP, self.settings)

        on_main(write)


def cached_angular(loaded: LoadedModel, stack: LayerStack, scoring: Scoring, cache: AngularCache, *,
                   text: TextSource | None = None, batch_size: int = 8, progress: Progress = SILENT) -> pd.DataFrame:
    """The cached table, measured unless the folder holds it with the same stamp: on ``text`` if given,
    else on the perplexity windows the run scores, else on the default text. Always read back from the
    file, so a fresh run and a resumed one see the same numbers, digit for digit."""
    if not cache.stored():
        windows = _windows(loaded, scoring, text, progress)
        result = angular_on_windows(loaded.model, windows,
                                    AngularConfig(max_block=cache.max_block, batch_size=batch_size, units=cache.units),
                                    stack=stack, progress=progress)
        cache.save(result.tidy() if cache.table == "layers" else result.blocks)
    return pd.read_csv(cache.path)


def _windows(loaded: LoadedModel, scoring: Scoring, text: TextSource | None, progress: Progress) -> TokenWindows:
    """The windows to measure on: ``text``'s, else the run's perplexity windows, else the default text's."""
    if text is None and scoring.windows is not None:
        return scoring.windows
    text = text or resolve_text(note=progress.note)
    seq_len = default_seq_len(loaded.model, scoring.settings.get("seq_len"))
    return TokenWindows.of(loaded.tokenizer, text.texts, seq_len=seq_len,
                           max_tokens=scoring.settings.get("ppl_max_tokens") or 65_536, name=text.name)
