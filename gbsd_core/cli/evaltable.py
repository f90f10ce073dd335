"""The files `gbsd eval` writes: per-pair pictures and record, results.csv / results.json, and table.md, the means
over pairs in the form of the GBSD paper's Table 1 (arXiv 2306.08251) with the paper's numbers beside ours.

Ratios in the table are ratios of the means over pairs (as the paper's 3.81x = GBSD mean / SD mean).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .outputs import write_text_atomic

if TYPE_CHECKING:
    from .eval import PairResult, Settings
    from .pairs import Pair

# GBSD paper (arXiv 2306.08251), Table 1: focused object, SD 1.5, 512x512.
PAPER_TXT2IMG = {"vol": (95.53, 3.81), "brenner_sum": (1.94e6, 3.10)}  # (GBSD value, GBSD / SD)
PAPER_IMG2IMG = {"vol": 1.73, "brenner_sum": 1.93}  # GBSD / input image (+73 %, +93 %)


def write_pair(out: Path, result: PairResult) -> None:
    """Pictures first, record.json last: a pair counts as finished only when its record exists."""
    from PIL import Image

    from ..bokeh.metrics import local_variance_of_laplacian, to_gray
    from ..bokeh.pictures import overlay_mask, sharpness_heatmap
    from .pngmeta import save_png_atomic

    d = out / "pairs" / result.record["id"]
    d.mkdir(parents=True, exist_ok=True)
    for name, image in result.images.items():
        save_png_atomic(image, d / f"{name}.png")
    save_png_atomic(Image.fromarray(result.mask.astype("uint8") * 255), d / "mask.png")
    save_png_atomic(overlay_mask(result.images["gbsd"], result.mask), d / "overlay.png")
    # One colour scale for both heat maps: the sharpest tile of either image.
    vmax = max(float(local_variance_of_laplacian(to_gray(im)).max()) for im in result.images.values())
    for name, image in result.images.items():
        save_png_atomic(sharpness_heatmap(image, vmax=max(vmax, 1.0)), d / f"heatmap_{name}.png")
    write_text_atomic(d / "record.json", json.dumps(result.record, indent=1))


def finished_record(path: Path, pair: Pair) -> dict | None:
    """The record.json of a finished pair, or None when it is missing, damaged (truncated, not the object
    `write_pair` writes) or of other settings for the pair: then the pair is run (again)."""
    try:
        r = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(r, dict) or any(r.get(k) != v for k, v in pair.key().items()):
        return None
    m, base = r.get("metrics"), r.get("baseline")
    if r.get("mode") not in ("txt2img", "img2img") or not isinstance(m, dict) or base not in ("sd", "input"):
        return None
    from dataclasses import fields

    from ..bokeh.metrics import SharpnessValues

    names = {f.name for f in fields(SharpnessValues)}

    def numbers(region: object) -> bool:
        return (isinstance(region, dict) and set(region) == names
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in region.values()))

    images = [m.get(base), m.get("gbsd")]
    if not all(isinstance(i, dict) and numbers(i.get("target")) and numbers(i.get("background")) for i in images):
        return None
    return r


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(records: list[dict]) -> dict[str, dict]:
    """mode -> {"n", "baseline", "means": {image: {region: {metric: mean over pairs}}}}."""
    out: dict[str, dict] = {}
    for mode in ("txt2img", "img2img"):
        recs = [r for r in records if r["mode"] == mode]
        if not recs:
            continue
        images = (recs[0]["baseline"], "gbsd")
        metric_names = list(recs[0]["metrics"]["gbsd"]["target"])
        means = {im: {region: {m: _mean([r["metrics"][im][region][m] for r in recs]) for m in metric_names}
                      for region in ("target", "background")} for im in images}
        out[mode] = {"n": len(recs), "baseline": images[0], "means": means}
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def markdown_table(summary: dict[str, dict], settings: Settings) -> str:
    """The paper's Table 1 form: means over pairs, GBSD / baseline and target / background ratios (of the means)."""
    from .pngmeta import sampler_label  # (PIL: not at import, `gbsd --help` stays instant)

    lines = [f"# Bokeh evaluation: {settings.model}, α = {settings.alpha}, layout fraction {settings.layout}, "
             f"{settings.steps} {sampler_label(settings.sampler, settings.schedule)} steps, CFG {settings.cfg}", ""]
    rows = [("VoL", "target", "laplacian_var", "{:.2f}"), ("VoL", "background", "laplacian_var", "{:.2f}"),
            ("Brenner (sum)", "target", "brenner_sum", "{:.3g}"),
            ("Brenner (mean)", "target", "brenner_mean", "{:.1f}"),
            ("Brenner (mean)", "background", "brenner_mean", "{:.1f}")]
    for mode, s in summary.items():
        base, m = s["baseline"], s["means"]
        base_label = "SD" if base == "sd" else "input"
        title = "Text to image: plain SD vs GBSD" if mode == "txt2img" else "Image to image: input image vs GBSD"
        lines += [f"## {title} (mean over {s['n']} pairs)", "",
                  f"| metric | region | {base_label} | GBSD | GBSD / {base_label} | paper GBSD | "
                  f"paper GBSD / {base_label} |", "|---|---|---:|---:|---:|---:|---:|"]
        for label, region, key, fmt in rows:
            paper_v, paper_r = "", ""
            if region == "target" and mode == "txt2img" and key in ("laplacian_var", "brenner_sum"):
                v, r = PAPER_TXT2IMG["vol" if key == "laplacian_var" else "brenner_sum"]
                paper_v, paper_r = fmt.format(v), f"{r:.2f}x"
            if region == "target" and mode == "img2img" and key in ("laplacian_var", "brenner_sum"):
                paper_r = f"{PAPER_IMG2IMG['vol' if key == 'laplacian_var' else 'brenner_sum']:.2f}x"
            a, b = m[base][region][key], m["gbsd"][region][key]
            lines.append(f"| {label} | {region} | {fmt.format(a)} | {fmt.format(b)} | {_ratio(b, a):.2f}x | "
                         f"{paper_v} | {paper_r} |")
        for label, key in (("VoL", "laplacian_var"), ("Brenner (mean)", "brenner_mean")):
            tb = [_ratio(m[im]["target"][key], m[im]["background"][key]) for im in (base, "gbsd")]
            lines.append(f"| {label} | target / background | {tb[0]:.2f} | {tb[1]:.2f} | {_ratio(tb[1], tb[0]):.2f}x"
                         " |  |  |")
        lines.append("")
    return "\n".join(lines)


def write_summary(out: Path, pairs: list[Pair], settings: Settings) -> str:
    """Collect every finished record (in pairs-file order) into results.csv/.json and table.md; returns the table."""
    records = [r for x in pairs if (r := finished_record(out / "pairs" / x.id / "record.json", x)) is not None]
    write_text_atomic(out / "results.json", json.dumps(records, indent=1))
    buf = io.StringIO()
    writer = None
    for r in records:
        for image, regions in r["metrics"].items():
            row = {k: r[k] for k in ("id", "prompt", "focus", "seed", "mode", "mask_source", "mask_fraction")}
            row["image"] = image
            for region, values in regions.items():
                row.update({f"{region}_{k}": v for k, v in values.items()})
            if writer is None:
                writer = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\n")
                writer.writeheader()
            writer.writerow(row)
    write_text_atomic(out / "results.csv", buf.getvalue())
    table = markdown_table(summarise(records), settings) if records else "no finished pairs\n"
    write_text_atomic(out / "table.md", table)
    return table
