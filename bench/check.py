"""`python -m bench.check FILE.json ...`: one line per measured record (OK / FAIL / SKIP / CUT SHORT, with the error),
exit status 1 if any configuration failed or was cut short. bench/gpu.sh prints it after its merge, so the log says
exactly what broke or was cut; with `--keep LIST` it prints LIST without the configurations that failed (for a
script that would rather skip a known crash than spend minutes on it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def status(rec: dict[str, Any]) -> tuple[str, str]:
    if "skipped" in rec:
        return "SKIP", rec["skipped"]
    if "error" in rec:
        return "FAIL", rec["error"].splitlines()[0][:400] if rec["error"] else "error"
    if not rec.get("complete"):
        return "CUT SHORT", "stopped before it finished (time cap?); parts measured: " + ", ".join(
            p for p in ("step", "loop", "text", "vae", "e2e") if p in rec)
    figures = [f"{k} {rec[k]:.4g}" for k in ("step_ms", "warmup_s", "loop_it_s") if rec.get(k) is not None]
    return "OK", ", ".join(figures)


def records(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        try:
            out += json.loads(Path(p).read_text())["results"]
        except (OSError, ValueError, KeyError) as e:
            out.append({"config": f"<{p}>", "dtype": "", "error": f"unreadable results file: {e}"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.check")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--keep", default=None, help="comma-separated configurations: print those that did not fail")
    args = ap.parse_args(argv)
    recs = records(args.inputs)
    if args.keep is not None:
        failed = {r["config"] for r in recs if status(r)[0] == "FAIL"}
        print(",".join(c for c in args.keep.split(",") if c and c not in failed))
        return 0
    bad = 0
    for r in recs:
        state, detail = status(r)
        bad += state in ("FAIL", "CUT SHORT")
        print(f"{state:<9} {r['config']} {r.get('dtype', '')} {r.get('size', '')}px batch {r.get('batch', '')}: "
              f"{detail}")
    print(f"{len(recs)} records, {bad} failed or cut short")
    return 1 if bad or not recs else 0


if __name__ == "__main__":
    sys.exit(main())
