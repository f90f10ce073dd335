"""The results tables (markdown) and the JSON file, both rewritten after every measurement so a run that is cut
short keeps what it measured; and the side-by-side table of runs from several machines (`python -m bench.merge`)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from gbsd_core.loading import atomic_write

from .timing import load_average

COLUMNS = [  # (header, record key, format)
    ("config", "config", "{}"),
    ("dtype", "dtype", "{}"),
    ("size", "size", "{}"),
    ("batch", "batch", "{}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("loop it/s", "loop_it_s", "{:.2f}"),
    ("img/s", "images_s", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.3g}"),
    ("% peak", "pct_peak", "{:.0f}"),
    ("text ms", "text_ms", "{:.1f}"),
    ("VAE ms", "vae_ms", "{:.0f}"),
    ("e2e s", "e2e_s", "{:.2f}"),
    ("peak GB", "peak_gb", "{:.2f}"),
    ("warm-up s", "warmup_s", "{:.2f}"),
    ("step x diffusers", "step_vs_diffusers", "{:.2f}"),
    ("loop x diffusers", "loop_vs_diffusers", "{:.2f}"),
    ("loop x diffusers+compile", "loop_vs_diffusers_compile", "{:.2f}"),
]
# per machine, side by side (python -m bench.merge over runs from several machines)
COMPARE_COLUMNS = [("it/s", "loop_it_s", "{:.2f}"), ("img/s", "images_s", "{:.2f}"), ("TFLOP/s", "tflops", "{:.3g}"),
                   ("% peak", "pct_peak", "{:.0f}")]


def _try(fn, default=None):
    try:
        return fn()
    except Exception:  # an optional fact about the machine: absent, never fatal
        return default


def _driver_version() -> str | None:
    def nvml() -> str:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v

    def smi() -> str | None:
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None

    return _try(nvml) or _try(smi)


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and software a run measured (schema.ENVIRONMENT_FIELDS)."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _try(lambda: __import__("triton").__version__),
        "diffusers": _try(lambda: __import__("diffusers").__version__),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "load_average": load_average(),
    }
    env["machine"] = env["cpu"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": torch.cuda.get_device_name(device), "gpu_count": torch.cuda.device_count(),
            "gpu_sm_count": props.multi_processor_count, "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "cudnn": _try(torch.backends.cudnn.version), "driver": _driver_version(),
        })
        env["machine"] = env["gpu"]
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _shape_key(r: dict[str, Any]) -> tuple:
    return r.get("machine"), r.get("dtype"), r.get("size"), r.get("batch"), bool(r.get("cudnn_benchmark"))


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Speed ratios against the diffusers baselines measured on the same machine at the same dtype, size and batch,
    and with the same cudnn.benchmark setting (> 1: ours faster); from the same source file when a merge holds one
    there (the same process: the same state of the machine), else from another file of that machine."""
    base: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("config") in ("diffusers", "diffusers+compile") and "error" not in r and "skipped" not in r:
            base.setdefault((r["config"], *_shape_key(r), r.get("source")), r)
            base.setdefault((r["config"], *_shape_key(r), "any"), r)

    def find(config: str, r: dict[str, Any]) -> dict[str, Any] | None:
        return base.get((config, *_shape_key(r), r.get("source"))) or base.get((config, *_shape_key(r), "any"))

    for r in records:
        d, dc = find("diffusers", r), find("diffusers+compile", r)
        if d and r.get("step_ms") and d.get("step_ms"):
            r["step_vs_diffusers"] = d["step_ms"] / r["step_ms"]
        if d and r.get("loop_it_s") and d.get("loop_it_s"):
            r["loop_vs_diffusers"] = r["loop_it_s"] / d["loop_it_s"]
        if dc and r.get("loop_it_s") and dc.get("loop_it_s"):
            r["loop_vs_diffusers_compile"] = r["loop_it_s"] / dc["loop_it_s"]


def progress(r: dict[str, Any]) -> str:
    """One line with what a record has measured so far (printed after each measurement, so a run's log holds its
    figures even when the run is cut before its table)."""
    figures = [f"{label} {fmt.format(r[key])}{unit}" for label, key, fmt, unit in (
        ("step", "step_ms", "{:.2f}", " ms"), ("warm-up", "warmup_s", "{:.2f}", " s"),
        ("loop", "loop_it_s", "{:.2f}", " it/s"), ("text", "text_ms", "{:.1f}", " ms"), ("VAE", "vae_ms", "{:.0f}", " ms"),
        ("e2e", "e2e_s", "{:.2f}", " s"), ("peak", "peak_gb", "{:.2f}", " GB")) if r.get(key) is not None]
    return f"[bench] {_label(r)} {r.get('dtype')} {r.get('size')}px batch {r.get('batch')}: " + ", ".join(figures)


def _label(r: dict[str, Any]) -> str:
    """The configuration's name, marked where cudnn.benchmark was on (two runs' rows of one config stay apart)."""
    return r["config"] + (" [cudnn.benchmark]" if r.get("cudnn_benchmark") else "")


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    v = r.get(key)
    return "–" if v is None else fmt.format(v)


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table; configurations that failed or were skipped get a note row. The recipes follow it."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        if "error" in r or "skipped" in r:
            note = r.get("error") or f"skipped: {r['skipped']}"
            lines.append(f"| {_label(r)} | {r['dtype']} | {r.get('size', '')} | {r.get('batch', '')} | "
                         + note.replace("|", "/").replace("\n", " ")[:200] + " |" + " |" * (len(COLUMNS) - 5))
            continue
        cells = [_cell(r, key, fmt) for _, key, fmt in COLUMNS]
        cells[0] = _label(r)
        if not r.get("complete", True):  # cut short (timeout): the parts it finished
            cells[0] += " (cut short)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", recipes(records)])


def recipes(records: list[dict[str, Any]]) -> str:
    """One line per configuration in the table: what exactly it runs; and where % of peak comes from."""
    seen: dict[str, str] = {}
    for r in records:
        seen.setdefault(r["config"], r.get("recipe", ""))
    lines = ["Recipes:"] + [f"- `{name}`: {recipe}" for name, recipe in seen.items()]
    peaks = {r["peak_source"] for r in records if r.get("peak_source")}
    lines.append("- % peak: dense fp16/bf16 tensor peak, " + "; ".join(sorted(peaks)) if peaks else
                 "- % peak: only for fp16/bf16 on a GPU in bench/peaks.py (otherwise TFLOP/s alone)")
    lines.append("- TFLOP/s: model FLOPs of one CFG step (bench/flops.py) / median step time; img/s: denoise loop "
                 "only (batch x it/s / steps)")
    return "\n".join(lines)


def compare_table(records: list[dict[str, Any]], machines: list[str]) -> str:
    """Runs from several machines side by side: one row per (config, dtype, size, batch), per machine its it/s,
    img/s, TFLOP/s and % of peak."""
    head = ["config", "dtype", "size", "batch"] + [f"{h} {m}" for m in machines for h, _, _ in COMPARE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in records:
        if "error" in r or "skipped" in r:
            continue
        rows.setdefault((r["config"], r["dtype"], r.get("size"), r.get("batch")), {}).setdefault(r.get("machine"), r)
    for (config, dtype, size, batch), by_machine in rows.items():
        cells = [config, dtype, str(size), str(batch)]
        for m in machines:
            r = by_machine.get(m, {})
            cells += [_cell(r, key, fmt) for _, key, fmt in COMPARE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"GBSD sweep ({rec['config']}): error: {rec['error']}"
    if "speedup" not in rec:  # cut short: what it measured
        runs = rec.get("independent_runs_s", [])
        return (f"GBSD sweep ({rec['config']}, K = {rec['k']}): cut short; shared layout stage "
                + (f"{rec['shared_s']:.2f} s" if "shared_s" in rec else "not measured")
                + f"; {len(runs)} of {rec['k']} independent runs measured ({sum(runs):.2f} s)")
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
