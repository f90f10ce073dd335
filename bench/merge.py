"""Merge the JSON files of several `python -m bench` runs into one JSON and one markdown table, ratios recomputed.

The runs may be sections of one machine's run (bench/gpu.sh runs each in its own process, so one hung compile cannot
take the others down): one table. Or runs from different machines (an H100's file and an A100's, say): each record
carries its machine (environment.machine), the ratios compare like with like on each machine, and a side-by-side
table puts it/s, img/s, TFLOP/s and % of peak of every machine in one row per (config, dtype, size, batch).
Missing or half-written inputs are reported and skipped; files of another schema major version are refused.

    python -m bench.merge OUT.json IN1.json IN2.json ... [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .__main__ import render
from .presets import PRESETS
from .report import add_ratios, write
from .schema import SCHEMA


def _major(schema: str | None) -> str:
    return (schema or "gbsd-bench/1").split(".")[0]


def merge(paths: list[str]) -> dict:
    merged: dict = {"schema": SCHEMA, "environment": None, "args": None, "results": [], "sweep": None,
                    "sources": []}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"[merge] skipping {p}: {e}", file=sys.stderr)
            continue
        if _major(data.get("schema")) != _major(SCHEMA):
            print(f"[merge] skipping {p}: schema {data.get('schema')!r}, this is {SCHEMA}", file=sys.stderr)
            continue
        env = data["environment"]
        merged["sources"].append({"path": p, "environment": env, "args": data["args"]})
        merged["environment"] = merged["environment"] or env
        merged["args"] = merged["args"] or data["args"]
        for r in data["results"]:
            r.setdefault("machine", env.get("machine"))
            r["source"] = len(merged["sources"]) - 1
        merged["results"] += data["results"]
        merged["sweep"] = merged["sweep"] or data.get("sweep")
    # One table in the usual order: per machine and dtype, configurations as PRESETS lists them (with cudnn.benchmark
    # after without), then size and batch.
    machines = {m: i for i, m in enumerate(dict.fromkeys(r.get("machine") for r in merged["results"]))}
    order = {name: i for i, name in enumerate(PRESETS)}
    merged["results"].sort(key=lambda r: (machines.get(r.get("machine"), 0), r.get("dtype", ""),
                                          order.get(r.get("config"), len(order)), bool(r.get("cudnn_benchmark")),
                                          r.get("size") or 0, r.get("batch") or 0))
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
