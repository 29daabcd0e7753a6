"""Merge several bench/run_quality.py result files into one (the sets of each, per scenario).

Long quality runs are split by set (different methods per set: the full sets skip the
drift scenario); this joins their JSON into the one file the README's tables come from,
keeping every run's metadata under ``meta.runs``, and writes the tables beside it.

    python bench/merge_quality.py bench/results/tmp/h-coarse.json bench/results/tmp/h-so.json \\
        bench/results/tmp/h-b77.json --out bench/results/quality_hierarchy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_quality import format_table, write_json  # noqa: E402


def merge(parts: list[dict]) -> dict:
    """One result payload from several: ``meta.runs`` lists each run's metadata; later sets win."""
    results: dict = {}
    for part in parts:
        for scenario, sets in part["results"].items():
            results.setdefault(scenario, {}).update(sets)
    return {"meta": {"runs": [p["meta"] for p in parts]}, "results": results}


def main(argv: list[str] | None = None) -> int:
    """Merge the files named on the command line into ``--out`` (.json, and .txt tables beside it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    payload = merge([json.loads(f.read_text()) for f in args.inputs])
    write_json(args.out, payload)
    tables = "\n\n".join(format_table(s, sets) for s, sets in payload["results"].items()) + "\n"
    args.out.with_suffix(".txt").write_text(tables)
    print(tables, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
