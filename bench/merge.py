"""Merge the JSON files of several `python -m bench` runs (e.g. the sections of bench/gpu.sh, each its own process
so one hung compile cannot take the others down) into one JSON and one markdown table, ratios recomputed across
them. Missing or half-written inputs are reported and skipped.

    python -m bench.merge OUT.json IN1.json IN2.json ... [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .__main__ import render
from .report import add_ratios, write
from .run import PRESETS


def merge(paths: list[str]) -> dict:
    merged: dict = {"environment": None, "args": None, "results": [], "sweep": None, "sources": []}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"[merge] skipping {p}: {e}", file=sys.stderr)
            continue
        merged["sources"].append({"path": p, "environment": data["environment"], "args": data["args"]})
        merged["environment"] = merged["environment"] or data["environment"]
        merged["args"] = merged["args"] or data["args"]
        merged["results"] += data["results"]
        merged["sweep"] = merged["sweep"] or data.get("sweep")
    # One table in the usual order (the sections' files come in name order): per dtype, as PRESETS lists them.
    order = {name: i for i, name in enumerate(PRESETS)}
    merged["results"].sort(key=lambda r: (r.get("dtype", ""), order.get(r.get("config"), len(order))))
    add_ratios(merged["results"])
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.merge")
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    merged = merge(args.inputs)
    if not merged["results"]:
        print("[merge] no results to merge", file=sys.stderr)
        return 1
    write(args.out, merged)
    text = render(merged)
    if args.markdown:
        write(args.markdown, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
