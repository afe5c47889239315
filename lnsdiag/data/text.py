"""Where diagnostic text comes from (its token windows are :mod:`lnsdiag.windows`).

Sources: a local file (plain text, or JSON Lines with a text field), a ``datasets`` dataset,
or the built-in corpus: the docstrings of Python's standard library, real English text that
is on every machine with Python, so everything works offline.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UserError
from ..model.load import hub_offline
from ..runs import atomic_write, cache_dir

DEFAULT_DATASET = ("wikitext", "wikitext-2-raw-v1", "test")
STDLIB = "stdlib"


@dataclass
class TextSource:
    """Documents plus a one-line description of where they came from (for meta.json)."""

    name: str
    texts: list[str]

    @property
    def characters(self) -> int:
        return sum(len(t) for t in self.texts)


def from_file(path: str | Path, field: str = "text") -> TextSource:
    """Plain text (one document), or JSON Lines / JSON with ``field`` in each record."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no such text file: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text") from exc
    if not raw.strip():
        raise UserError(f"text file {path} is empty")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        texts = []
        lines = [raw] if path.suffix.lower() == ".json" else raw.splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            records = record if isinstance(record, list) else [record]
            for rec in records:
                if not isinstance(rec, dict) or field not in rec:
                    raise UserError(f"{path}:{number}: record has no {field!r} field (use --text-field)")
                texts.append(str(rec[field]))
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise UserError(f"text file {path} holds no non-empty {field!r} values")
        return TextSource(f"file:{path}", texts)
    return TextSource(f"file:{path}", [raw])


def from_dataset(name: str, config: str | None = None, split: str = "test", field: str = "text") -> TextSource:
    """Text of a ``datasets`` dataset (needs the hub, or its local cache)."""
    if name == STDLIB:
        return stdlib_corpus(split)
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot get it"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"cannot load dataset {name}{'/' + config if config else ''} [{split}]: {first} "
            "(offline? use --text-file PATH or --dataset stdlib)"
        ) from exc
    if field not in ds.column_names:
        raise UserError(f"dataset {name} has no {field!r} column (columns: {', '.join(ds.column_names)})")
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError(f"dataset {name} [{split}] holds no text")
    return TextSource(f"dataset:{name}{'/' + config if config else ''}[{split}]", texts)


def resolve_text(
    text_file: str | Path | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    field: str = "text",
    *,
    note: Callable[[str], None] | None = None,
) -> TextSource:
    """The text a command runs on: a file, a named dataset, else wikitext-2, else stdlib.

    Falling back to the built-in corpus is announced (to ``note``, else as a warning) and
    recorded in the source's name, so no result silently comes from other text than asked.
    """
    if text_file is not None:
        return from_file(text_file, field)
    if dataset is not None:
        return from_dataset(dataset, dataset_config, split or "test", field)
    name, config, default_split = DEFAULT_DATASET
    try:
        if hub_offline() and not _dataset_cached(name):
            raise UserError("offline")
        return from_dataset(name, config, split or default_split, field)
    except UserError:
        message = ("wikitext-2 is not reachable (offline?); using the built-in stdlib-docstring corpus. "
                   "Pass --text-file or --dataset to choose the text.")
        if note is not None:
            note(message)
        else:
            warnings.warn(message, stacklevel=2)
        return stdlib_corpus("test")


@dataclass(frozen=True)
class TextOptions:
    """Which text a measuring command runs on (``--text-file``, ``--dataset``, ...); see :func:`resolve_text`."""

    text_file: str | Path | None = None
    text_field: str = "text"
    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None

    def resolve(self, note: Callable[[str], None] | None = None) -> TextSource:
        return resolve_text(self.text_file, self.dataset, self.dataset_config, self.split, self.text_field, note=note)


def _dataset_cached(name: str) -> bool:
    """Whether ``datasets`` has any local copy of ``name`` (so offline mode can still load it)."""
    try:
        import datasets.config

        root = Path(datasets.config.HF_DATASETS_CACHE)
        hub = Path(datasets.config.HF_CACHE_HOME) / "hub"
    except (ImportError, AttributeError):
        return False
    slug = name.replace("/", "___")
    return any(root.glob(f"*{slug}*")) or (hub / f"datasets--{name.replace('/', '--')}").exists()


# --- the built-in corpus -------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "turtledemo", "ensurepip", "__pycache__", "encodings", "__phello__"}


@lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[str, str], ...]:
    """``(relative path, text)`` per stdlib module: its docstrings, read with ``ast``.

    Nothing is imported (no side effects). ``pydoc_data/topics.py`` adds the language
    reference's prose. Parsing takes ~10 s, so the result is cached on disk per Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    cache = cache_dir() / f"stdlib-docstrings-{sys.version_info[0]}.{sys.version_info[1]}.json"
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("root") == str(root):
            return tuple((rel, text) for rel, text in cached["docs"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        parts = []
        if rel.as_posix() == "pydoc_data/topics.py":
            parts = [n.value.strip() for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) >= 200]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc) >= 40:
                    parts.append(inspect.cleandoc(doc))
        if parts:
            docs.append((rel.as_posix(), "\n\n".join(parts)))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps({"root": str(root), "docs": docs}))
    except OSError:
        pass  # a read-only home only costs the parse next time
    return tuple(docs)


def stdlib_corpus(split: str = "train") -> TextSource:
    """Docstrings of the standard library; ``test`` is a fixed tenth of its modules.

    The split is by a hash of each module's path, so it is the same on every run.
    """
    if split not in ("train", "test", "all"):
        raise UserError(f"the stdlib corpus has splits train, test and all, not {split!r}")
    docs = _stdlib_documents()
    if not docs:
        raise UserError("found no standard-library sources to read docstrings from")
    picked = [
        text for rel, text in docs
        if split == "all" or (zlib.crc32(rel.encode()) % 10 == 0) == (split == "test")
    ]
    return TextSource(f"stdlib-docstrings[{split}]", picked)
