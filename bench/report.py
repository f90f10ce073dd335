"""The results table (markdown) and the JSON file, both rewritten after every configuration so a run that is cut
short keeps what it measured."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from gbsd_core.loading import atomic_write

from .timing import load_average

COLUMNS = [  # (header, record key, format)
    ("config", "config", "{}"),
    ("dtype", "dtype", "{}"),
    ("compile", "compile", "{}"),
    ("graphs", "cuda_graphs", "{}"),
    ("text ms", "text_ms", "{:.1f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("loop it/s", "loop_it_s", "{:.2f}"),
    ("VAE ms", "vae_ms", "{:.0f}"),
    ("e2e s", "e2e_s", "{:.2f}"),
    ("peak GB", "peak_gb", "{:.2f}"),
    ("warm-up s", "warmup_s", "{:.2f}"),
    ("step x diffusers", "step_vs_diffusers", "{:.2f}"),
    ("loop x diffusers", "loop_vs_diffusers", "{:.2f}"),
    ("loop x diffusers+compile", "loop_vs_diffusers_compile", "{:.2f}"),
]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Speed ratios against the diffusers baselines measured in the same run at the same dtype (> 1: ours faster)."""
    def base(name: str, dtype: str) -> dict[str, Any] | None:
        return next((r for r in records if r["config"] == name and r["dtype"] == dtype and "error" not in r), None)

    for r in records:
        d, dc = base("diffusers", r["dtype"]), base("diffusers+compile", r["dtype"])
        if d and r.get("step_ms") and d.get("step_ms"):
            r["step_vs_diffusers"] = d["step_ms"] / r["step_ms"]
        if d and r.get("loop_it_s") and d.get("loop_it_s"):
            r["loop_vs_diffusers"] = r["loop_it_s"] / d["loop_it_s"]
        if dc and r.get("loop_it_s") and dc.get("loop_it_s"):
            r["loop_vs_diffusers_compile"] = r["loop_it_s"] / dc["loop_it_s"]


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table; configurations that failed or were skipped get a note row."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        if "error" in r or "skipped" in r:
            note = r.get("error") or f"skipped: {r['skipped']}"
            lines.append(f"| {r['config']} | {r['dtype']} | " + note.replace("|", "/").replace("\n", " ")[:200]
                         + " |" + " |" * (len(COLUMNS) - 3))
            continue
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("–" if v is None else fmt.format(v))
        if not r.get("complete", True):  # cut short (timeout): the parts it finished
            cells[0] += " (cut short)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"GBSD sweep ({rec['config']}): error: {rec['error']}"
    how = "measured" if rec["independent_mode"] == "measure" else "K x one measured run"
    return "\n".join([
        f"GBSD sweep, K = {rec['k']} alpha values, sigma = {rec['layout']}, {rec['steps']} steps, "
        f"{rec['size']}x{rec['size']}, config {rec['config']}:",
        "",
        "| run | UNet evaluations | seconds |",
        "|---|---|---|",
        f"| shared layout stage (one sweep call) | {rec['shared_unet_calls']} "
        f"(expected {rec['expected_shared_unet_calls']}) | {rec['shared_s']:.2f} |",
        f"| K independent runs ({how}) | {rec['independent_unet_calls']} | {rec['independent_s']:.2f} |",
        f"| ratio | {rec['independent_unet_calls'] / rec['shared_unet_calls']:.2f}x | {rec['speedup']:.2f}x |",
    ])


def write(path: str | None, obj: Any) -> None:
    """Atomic write (a partial run never leaves half a file)."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, default=str)
    atomic_write(p, lambda tmp: tmp.write_text(text))
