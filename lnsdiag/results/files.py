"""The files a run writes for machines: its tables (CSV), then its records (meta.json).

A result object writes them itself (``run.write()``), so a notebook gets the same folder as the
command line; the command line adds what people read (LaTeX, plots) and lists every file in one
order: the tables, what it drew, the records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..runs import write_csv, write_json


@dataclass
class RunFiles:
    """What a result wrote: its tables and its records, each list in the order written."""

    tables: list[Path]
    records: list[Path]

    def around(self, presented: Sequence[Path]) -> list[Path]:
        """Every file in the order a command lists them: the tables, ``presented``, the records."""
        return [*self.tables, *presented, *self.records]


def write_tables(folder: Path, tables: Mapping[str, pd.DataFrame], meta: dict[str, Any]) -> RunFiles:
    """Each table as ``folder/name`` (CSV, atomically), then ``meta.json``: the usual run's files."""
    written = [write_csv(folder / name, frame) for name, frame in tables.items()]
    return RunFiles(written, [write_json(folder / "meta.json", meta)])
