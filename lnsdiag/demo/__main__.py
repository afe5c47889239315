"""``python -m lnsdiag.demo export|compare``: regenerate the demo's shipped weights, or retrain and compare.

An entry point like the command line: it may use the runners and the terminal display.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..cli import ui
from ..errors import UserError
from ..runners.demo import compare_with_shipped, comparison_lines
from ..runs import write_json
from .model import SHIPPED, export_shipped


def main(argv: list[str] | None = None) -> int:
    """``python -m lnsdiag.demo export|compare``: regenerate the shipped weights, or check them."""
    parser = argparse.ArgumentParser(prog="python -m lnsdiag.demo", description="Regenerate the demo's "
                                     "shipped weights (export), or retrain them and compare (compare).")
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="train the default Pre-LN and LNS demo models from scratch (minutes) "
                                           "and write them, float16 with a manifest, into the package")
    export.add_argument("--dest", type=Path, default=SHIPPED, help="folder to write into [%(default)s]")
    compare = sub.add_parser("compare", help="retrain both shipped models from scratch in a temporary cache and "
                                             "measure retrained and shipped models the same way")
    compare.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lnsdiag-demo-") as tmp:
        os.environ["LNSDIAG_CACHE"] = tmp  # never touch the user's cache; trains from scratch
        try:
            with ui.RichProgress() as progress:
                if args.action == "export":
                    for folder in export_shipped(dest=args.dest, progress=progress):
                        size = sum(p.stat().st_size for p in folder.iterdir())
                        print(f"wrote {folder} ({size / 1e6:.1f} MB)", file=sys.stderr)
                    return 0
                comparison = compare_with_shipped(progress=progress)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print("\n".join(comparison_lines(comparison)))
        if args.json:
            write_json(args.json, comparison)
        return 0 if comparison["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
