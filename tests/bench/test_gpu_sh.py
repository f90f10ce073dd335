"""bench/gpu.sh's plumbing, on the CPU (GBSD_GPU_SMOKE=1: the same plan, tiny): the order of the sections, the
per-section tar of everything measured so far, a section killed at its cap whose partial JSON still comes back, the
call's deadline, and what comes back from $OUT (the device tool's limit: at most 8 plain files)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from _util import REPO

CALL1 = ["setup", "tests", "sd15-eager", "sd15-graphs-compile", "sd15-diffusers-compile", "sd15-batch", "sdxl-eager",
         "sd15-cudnn"]
BENCH1 = CALL1[2:]
# PY for gpu.sh: before each bench section it notes which section JSONs measured.tgz holds, and it stalls the
# headline section's loop (100000 timed loops), so that section is killed at its cap after its step was measured.
WRAPPER = """#!/usr/bin/env bash
if [[ " $* " == *" -m bench "* ]]; then
  prev=; args=()
  for a in "$@"; do
    [[ $prev == --json ]] && json=$(basename "$a" .json)
    [[ $prev == --loop-repeat && -n ${STALL:-} && " $* " == *"/$STALL.json "* ]] && a=100000
    args+=("$a"); prev=$a
  done
  echo "$json: $(tar -tzf "$OUT/measured.tgz" 2>/dev/null | grep -o '[a-z0-9-]*[.]json' | sort | tr '\\n' ' ')" \\
    >> "$WRAPPER_LOG"
  set -- "${args[@]}"
fi
exec "$REAL_PY" "$@"
"""


def _gpu_sh(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    out, work = tmp_path / "out", tmp_path / "work"
    wrapper = tmp_path / "py"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    full = dict(os.environ, OUT=str(out), GBSD_GPU_WORK=str(work), GBSD_GPU_SMOKE="1", PY=str(wrapper),
                REAL_PY=sys.executable, WRAPPER_LOG=str(tmp_path / "wrapper.log"), **env)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    return proc, out, (out / "gpu.log").read_text()


def _sections(log: str) -> list[str]:
    """The sections in the order they started."""
    return re.findall(r"^=== \[\d+s\] section ([\w-]+)[: ].*\(cap \d+s, planned", log, re.M)


def _tar_json(out: Path, name: str) -> dict:
    with tarfile.open(out / "measured.tgz") as tar:
        return json.load(tar.extractfile(f"./{name}.json"))


def test_call1_order_per_section_tar_and_a_section_cut_at_its_cap(tmp_path):
    """The whole first call, tiny on the CPU, with its headline section (graphs+compile; `fast` stands in for it on
    a CPU) stalled in its loop and cut at a 60 s cap. Generous caps and budget elsewhere: a loaded CI machine must not
    cut the others."""
    caps = " ".join(f"{name}=600" for name in CALL1) + " sd15-graphs-compile=60"
    proc, out, log = _gpu_sh(tmp_path, GBSD_GPU_CAPS=caps, GBSD_GPU_BUDGET="5000", STALL="sd15-graphs-compile")
    assert proc.returncode == 0, log[-3000:]
    # the order, each section once, then the merge
    assert _sections(log) == CALL1
    assert log.index("section sd15-cudnn rc=0") < log.index("] merge") < log.index("] done")
    # the cut: at its cap, after its step was measured; the sections after it still ran
    assert "section sd15-graphs-compile: CUT at its 60s cap" in log
    for name in BENCH1:
        if name != "sd15-graphs-compile":
            assert f"section {name} rc=0" in log, name
    assert re.search(r"^\[bench\] fast float32 64px batch 1: step [\d.]+ ms", log, re.M)  # printed as measured
    # the tar after every section: when a bench section starts, measured.tgz holds every earlier section's JSON
    held = dict(line.split(":", 1) for line in (tmp_path / "wrapper.log").read_text().splitlines())
    for i, name in enumerate(BENCH1):
        assert held[name].split() == sorted(f"{n}.json" for n in BENCH1[:i]), (name, held[name])
    # the cut section's partial JSON came back: its step, no loop, not complete; check and the merge say so
    cut = _tar_json(out, "sd15-graphs-compile")["results"]
    assert len(cut) == 1 and "step" in cut[0] and "loop" not in cut[0] and cut[0]["complete"] is False
    assert re.search(r"^CUT SHORT fast float32 64px batch 1: .*parts measured: step$", log, re.M)
    merged = json.loads((out / "results.json").read_text())
    assert any(r["config"] == "fast" and r.get("step") and "loop" not in r for r in merged["results"])
    assert "fast (cut short)" in (out / "RESULTS-gpu.md").read_text()
    # diffusers first in every list; channels-last measured both ways; cudnn.benchmark on in its own section
    for name in BENCH1:
        configs = [r["config"] for r in _tar_json(out, name)["results"]]
        assert "diffusers" not in configs or configs[0] == "diffusers", (name, configs)
    assert [r["config"] for r in _tar_json(out, "sd15-eager")["results"]] == [
        "diffusers", "graphs", "fast", "eager", "graphs-nchw", "fast-nchw"]
    cudnn = _tar_json(out, "sd15-cudnn")
    assert cudnn["environment"]["cudnn_benchmark"] is True and all(r["cudnn_benchmark"] for r in cudnn["results"])
    assert _tar_json(out, "sd15-eager")["environment"]["cudnn_benchmark"] is False
    assert "diffusers [cudnn.benchmark]" in (out / "RESULTS-gpu.md").read_text()
    # what comes back: at most 8 plain files, named as the device tool allows, no half-written tar
    files = sorted(p.name for p in out.iterdir())
    assert files == ["RESULTS-gpu.md", "gpu.log", "measured.tgz", "results.json", "tests.log"], files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert "passed" in (out / "tests.log").read_text() or "skipped" in (out / "tests.log").read_text()


def test_the_deadline_skips_what_no_longer_fits(tmp_path):
    """GBSD_GPU_BUDGET=45: after the set-up, no section has 20 s left (45 s less the merge's reserve and the kill
    grace): each is skipped with a line that says so, and the call still packs and ends. Call 2's plan here."""
    proc, out, log = _gpu_sh(tmp_path, GBSD_GPU_BUDGET="45", GBSD_GPU_CALL="2")
    assert proc.returncode == 0, log[-3000:]
    for name in ("sdxl-graphs-compile", "sdxl-diffusers-compile", "sd15-fast-compile"):
        assert f"section {name} SKIPPED: under 20s of the call's 45s left" in log, name
    assert "] done" in log and (out / "measured.tgz").exists()


def test_call3_kernels_parts_and_the_sweep(tmp_path):
    """The third call's plan, tiny: the Triton tests' command, bench.kernels (interpreted), fast+triton (stood in by
    fast), text / VAE / e2e, the sweep, whose record is in its JSON, and the SD-Turbo few-step end to end."""
    caps = " ".join(f"{n}=600" for n in ("setup", "tests-triton", "kernels", "sd15-triton", "sd15-parts", "sd15-sweep",
                                          "turbo-few-step"))
    proc, out, log = _gpu_sh(tmp_path, GBSD_GPU_CALL="3", GBSD_GPU_CAPS=caps, GBSD_GPU_BUDGET="5000")
    assert proc.returncode == 0, log[-3000:]
    assert [s for s in _sections(log) if s != "setup"] == ["tests-triton", "kernels", "sd15-triton", "sd15-parts",
                                                           "sd15-sweep", "turbo-few-step"]
    for name in ("kernels", "sd15-triton", "sd15-parts", "sd15-sweep", "turbo-few-step"):
        assert f"section {name} rc=0" in log, name
    assert _tar_json(out, "kernels")["kernels"]
    sweep = _tar_json(out, "sd15-sweep")["sweep"]
    assert sweep["speedup"] > 0 and len(sweep["independent_runs_s"]) == 2
    parts = _tar_json(out, "sd15-parts")["results"]
    assert [r["config"] for r in parts] == ["diffusers", "fast", "graphs"] and "vae" in parts[0]
    few = _tar_json(out, "turbo-few-step")["results"]
    assert {(r["impl"], r["steps"]) for r in few} == {(i, n) for i in ("ours", "diffusers") for n in (1, 4)}
    assert all(r["images_s"] > 0 and abs(sum(r["shares"].values()) - 1) < 0.05 for r in few)
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS-gpu.md", "gpu.log", "measured.tgz", "results.json",
                                                      "tests-triton.log"]
