"""The benchmark as a GPU benchmarking tool, checked on the CPU: FLOPs per step, the peak table, batch and size lists,
the documented JSON schema, merging runs of several machines side by side, the smoke summary. (bench/gpu.sh's
plumbing: test_gpu_sh.py; the wheels it carries: test_wheels.py.)"""
from __future__ import annotations

import json
import sys

import pytest
from _util import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import check, merge  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.flops import step_flops  # noqa: E402
from bench.peaks import PEAKS, peak_for  # noqa: E402
from bench.schema import ENVIRONMENT_FIELDS, RECORD_FIELDS, SCHEMA, derive  # noqa: E402


# ----------------------------------------------------------------------------------------------------- FLOPs, peaks
def test_step_flops_of_sd15_at_512_match_the_count_by_hand():
    """By hand, an SD1.5 UNet at a 64x64 latent at 0.40 TMAC per sample: 1.61 TFLOP per CFG step. The
    counter (FlopCounterMode over the real CFGStep on the meta device) must agree, and scale with the batch."""
    one = step_flops("sd15", False, 512, 1, 7.5)
    print(f"SD1.5 512² CFG step: {one / 1e12:.3f} TFLOP")
    assert one == pytest.approx(1.61e12, rel=0.01)
    assert step_flops("sd15", False, 512, 1, 1.0) == pytest.approx(one / 2, rel=1e-3)  # no CFG: half the rows
    assert step_flops("sd15", True, 64, 2, 7.5) == pytest.approx(2 * step_flops("sd15", True, 64, 1, 7.5), rel=1e-3)


def test_step_flops_of_sdxl_at_1024_match_diffusers_own_unet():
    """SDXL base at 1024² (a 128x128 latent) with CFG: our count (our UNet in CFGStep, with y) against diffusers'
    own UNet2DConditionModel of the SDXL config, an independent implementation of the network, under the same
    counter on the meta device: the same FLOPs. About 8.4x SD1.5 at 512²."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.reference import diffusers_unet_config
    from gbsd_core.unet import UNetConfig

    ours = step_flops("sdxl", False, 1024, 1, 7.5)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(UNetConfig.sdxl_base())).eval()
        x, ctx = torch.empty(2, 4, 128, 128), torch.empty(2, 77, 2048)
        added = {"text_embeds": torch.empty(2, 1280), "time_ids": torch.empty(2, 6)}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, torch.zeros(2), encoder_hidden_states=ctx, added_cond_kwargs=added)
    print(f"SDXL 1024² CFG step: {ours / 1e12:.2f} TFLOP (diffusers' UNet: {counter.get_total_flops() / 1e12:.2f})")
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert ours / step_flops("sd15", False, 512, 1, 7.5) == pytest.approx(8.4, abs=0.1)


def test_peak_table_matches_gpu_names_and_only_half_precision():
    assert peak_for("NVIDIA H100 80GB HBM3", "float16").name == "H100 SXM"
    assert peak_for("NVIDIA H100 PCIe", "bfloat16").name == "H100 PCIe"
    assert peak_for("NVIDIA H200", "bfloat16").tflops == pytest.approx(989.5)
    assert peak_for("NVIDIA H200 NVL", "float16").name == "H200 NVL"
    assert peak_for("NVIDIA A100-SXM4-80GB", "float16").tflops == 312.0
    assert peak_for("NVIDIA A10G", "float16") is None  # not the A10
    assert peak_for("NVIDIA GeForce RTX 3090 Ti", "float16") is None
    assert peak_for("NVIDIA H100 80GB HBM3", "float32") is None and peak_for(None, "float16") is None
    assert all(p.source and p.tflops > 0 for p in PEAKS)
    rec = {"step": {"first_s": 1.0, "median_s": 0.01, "runs_s": [0.01]}, "flops_per_step": 1.61e12, "steps": 50,
           "batch": 1, "dtype": "float16", "device": "cuda"}
    derive(rec, "NVIDIA H100 80GB HBM3")
    assert rec["tflops"] == pytest.approx(161.0) and rec["pct_peak"] == pytest.approx(100 * 161 / 989.5)
    unknown = dict(rec)
    for key in ("tflops", "pct_peak", "peak_tflops", "peak_source"):
        unknown.pop(key)
    derive(unknown, "Some Future GPU")
    assert unknown["tflops"] == pytest.approx(161.0) and "pct_peak" not in unknown


# ----------------------------------------------------------------------------------------------------- lists, schema
def test_batch_and_size_lists_and_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "lists.json"
    rc = main(["--tiny", "--device", "cpu", "--threads", "1", "--steps", "2", "--repeat", "1", "--size", "64,32",
               "--batch", "1,2", "--configs", "fast,diffusers", "--parts", "step,loop", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    shapes = [(r["config"], r["size"], r["batch"]) for r in data["results"]]
    assert shapes == [(c, size, b) for c in ("fast", "diffusers") for size in (64, 32) for b in (1, 2)]
    for r in data["results"]:
        assert r["complete"] and "error" not in r, r.get("error")
        assert r["images_s"] == pytest.approx(r["batch"] * r["loop_it_s"] / 2)
        assert r["flops_per_step"] == step_flops("sd15", True, r["size"], r["batch"], 7.5)
        assert r["step_vs_diffusers"] > 0  # against diffusers at the same size and batch
    assert "img/s" in printed and "TFLOP/s" in printed and "Recipes:" in printed
    # The schema: every field written is declared, and every declared field is documented in bench/README.md.
    readme = (REPO / "bench" / "README.md").read_text()
    assert set(data["environment"]) <= set(ENVIRONMENT_FIELDS)
    for r in data["results"]:
        assert set(r) <= set(RECORD_FIELDS), set(r) - set(RECORD_FIELDS)
    undocumented = [k for k in (*ENVIRONMENT_FIELDS, *RECORD_FIELDS) if f"`{k}`" not in readme]
    assert not undocumented and SCHEMA in readme


def test_bad_lists_are_refused(capsys):
    for bad in (["--batch", "1,x"], ["--size", "500"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            main(["--tiny", *bad])
    assert "multiples of 8" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- merge, check
def _run_file(tmp_path, name: str, machine: str, step_ms: dict[str, float]) -> str:
    results = []
    for config, ms in step_ms.items():
        rec = {"config": config, "impl": "ours" if config != "diffusers" else "diffusers", "dtype": "float16",
               "size": 512, "batch": 1, "steps": 50, "device": "cuda", "complete": True, "flops_per_step": 1.61e12,
               "step": {"first_s": 1.0, "median_s": ms / 1e3, "runs_s": [ms / 1e3]},
               "loop": {"first_s": 1.0, "median_s": 50 * ms / 1e3, "runs_s": [50 * ms / 1e3]}, "recipe": config}
        derive(rec, machine)
        results.append(rec)
    env = {"machine": machine, "gpu": machine, "cpu": "x", "torch_threads": 1, "torch": "2.x", "date": name,
           "load_average": None}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"schema": SCHEMA, "environment": env, "args": {"arch": "sd15", "tiny": False,
                                                                               "steps": 50, "cfg": 7.5},
                                "results": results, "sweep": None}))
    return str(path)


def test_merge_puts_machines_side_by_side_and_compares_like_with_like(tmp_path, capsys):
    a = _run_file(tmp_path, "h100", "NVIDIA H100 80GB HBM3", {"graphs": 10.0, "diffusers": 20.0})
    b = _run_file(tmp_path, "a100", "NVIDIA A100-SXM4-80GB", {"graphs": 30.0, "diffusers": 45.0})
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"environment": {}, "args": {}, "results": []}))  # schema 1: refused
    out = tmp_path / "merged.json"
    assert merge.main([str(out), a, b, str(old), "--markdown", str(tmp_path / "m.md")]) == 0
    text = capsys.readouterr()
    assert "schema" in text.err
    merged = json.loads(out.read_text())
    by = {(r["machine"], r["config"]): r for r in merged["results"]}
    assert by[("NVIDIA H100 80GB HBM3", "graphs")]["step_vs_diffusers"] == pytest.approx(2.0)
    assert by[("NVIDIA A100-SXM4-80GB", "graphs")]["step_vs_diffusers"] == pytest.approx(1.5)  # its own baseline
    assert by[("NVIDIA A100-SXM4-80GB", "graphs")]["pct_peak"] == pytest.approx(100 * 1.61e12 / 0.03 / 1e12 / 312)
    side = text.out[text.out.index("Side by side:"):]
    assert "it/s NVIDIA H100 80GB HBM3" in side and "% peak NVIDIA A100-SXM4-80GB" in side
    row = next(line for line in side.splitlines() if line.startswith("| graphs "))
    assert row.count("|") == 4 + 2 * 4 + 1  # config, dtype, size, batch + 4 figures per machine


def test_check_says_what_broke_and_filters_configurations(tmp_path, capsys):
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps({"results": [
        {"config": "fast", "dtype": "float16", "size": 256, "batch": 1, "complete": True, "step_ms": 3.0},
        {"config": "fast+compile", "dtype": "float16", "size": 256, "batch": 1,
         "error": "Unsupported: Attempted to call function marked as skipped\nmore"},
        {"config": "graphs", "dtype": "float16", "size": 256, "batch": 1, "complete": False, "step": {}},
        {"config": "graphs+compile", "dtype": "float16", "skipped": "needs CUDA"}]}))
    assert check.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL      fast+compile float16 256px batch 1: Unsupported: Attempted to call" in out
    assert "CUT SHORT graphs" in out and "SKIP      graphs+compile" in out and "OK        fast" in out
    assert check.main([str(path), "--keep", "fast,fast+compile,graphs,diffusers"]) == 0
    assert capsys.readouterr().out.strip() == "fast,graphs,diffusers"



def test_cudnn_benchmark_runs_stay_apart_and_a_cut_sweep_shows_what_it_measured():
    """A record measured with cudnn.benchmark on is compared only with a diffusers baseline measured with it on, and
    is marked in the table; a sweep cut short (bench/gpu.sh's caps) prints the part it measured."""
    from bench.report import add_ratios, progress, sweep_table, table

    def rec(config: str, ms: float, cudnn: bool) -> dict:
        r = {"config": config, "dtype": "float16", "size": 512, "batch": 1, "steps": 50, "machine": "H",
             "cudnn_benchmark": cudnn, "complete": True, "step": {"first_s": 1.0, "median_s": ms / 1e3, "runs_s": []}}
        derive(r, "H")
        return r

    records = [rec("diffusers", 20.0, False), rec("fast", 10.0, True), rec("fast", 16.0, False)]
    add_ratios(records)
    assert "step_vs_diffusers" not in records[1] and records[2]["step_vs_diffusers"] == pytest.approx(1.25)
    assert "| fast [cudnn.benchmark] | float16 | 512 | 1 | 10.0 |" in table(records)
    assert progress(records[1]) == "[bench] fast [cudnn.benchmark] float16 512px batch 1: step 10.00 ms, warm-up 1.00 s"
    cut = {"config": "graphs", "k": 10, "shared_s": 1.5, "independent_runs_s": [0.5, 0.25]}
    assert sweep_table(cut) == ("GBSD sweep (graphs, K = 10): cut short; shared layout stage 1.50 s; 2 of 10 "
                                "independent runs measured (0.75 s)")
