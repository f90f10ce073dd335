"""Smoke test of the benchmark harness (`python -m bench`) at tiny size: it runs ours and the diffusers baseline,
prints the table, writes the JSON with every field, and counts the GBSD sweep's UNet evaluations right."""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time

import pytest
from _util import REPO, model_ddim

if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.__main__ import main  # noqa: E402
from bench.schema import SCHEMA  # noqa: E402

MEASURED = ("text_ms", "step_ms", "loop_it_s", "loop_s", "vae_ms", "e2e_s", "peak_gb", "warmup_s", "build_s",
            "images_s", "tflops")


def test_tiny_run_prints_table_and_writes_json(tmp_path, capsys, monkeypatch):
    t0 = time.perf_counter()
    # Everything the run puts in the temp folder it removes again (it once left a diffusers tokenizer folder
    # per run in /tmp); torch's own compile cache may stay.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    steps, k, layout = 5, 3, 0.8
    rc = main(["--tiny", "--device", "cpu", "--threads", "1", "--steps", str(steps), "--repeat", "1",
               "--configs", "eager,fast,graphs,diffusers", "--sweep", "eager", "--sweep-k", str(k),
               "--sweep-layout", str(layout), "--json", str(out), "--markdown", str(md)])
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []

    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    env = data["environment"]
    for key in ("date", "torch", "cpu", "torch_threads", "load_average", "diffusers"):
        assert key in env, key
    assert env["torch_threads"] == 1  # one thread: an oversubscribed CI box stalls OpenMP barriers

    recs = {r["config"]: r for r in data["results"]}
    assert list(recs) == ["eager", "fast", "graphs", "diffusers"]
    assert recs["graphs"]["skipped"] == "needs CUDA"  # CUDA graphs are CUDA only
    for name in ("eager", "fast", "diffusers"):
        r = recs[name]
        assert "error" not in r, r.get("error")
        assert (r["impl"], r["device"], r["dtype"], r["size"], r["steps"], r["batch"]) == (
            "diffusers" if name == "diffusers" else "ours", "cpu", "float32", 64, steps, 1)
        for key in MEASURED:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (name, key, r.get(key))
        assert r["loop_it_s"] == pytest.approx(steps / r["loop_s"])
        assert r["images_s"] == pytest.approx(r["loop_it_s"] / steps) and r["images_s_from"] == "loop"
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1e3) / 1e12)
        assert "pct_peak" not in r  # a CPU: TFLOP/s only
        assert r["params"]["unet"] > 0
    assert recs["fast"]["fast_options"]["fuse_qkv"] is True and recs["eager"]["fast_options"] is None
    # Ratios against the same run's diffusers baseline.
    assert recs["eager"]["step_vs_diffusers"] == pytest.approx(recs["diffusers"]["step_ms"] / recs["eager"]["step_ms"])
    assert recs["diffusers"]["loop_vs_diffusers"] == pytest.approx(1.0)

    # The sweep: n_layout = round(layout·n) shared steps at batch 1, then K branches for the rest (counted by the
    # pipeline's own UNet-call counter) vs K·n for independent runs.
    sw = data["sweep"]
    assert "error" not in sw, sw.get("error")
    n_layout = 4  # round(0.8 · 5)
    assert sw["shared_unet_calls"] == n_layout + k * (steps - n_layout) == 7
    assert sw["independent_unet_calls"] == k * steps
    assert sw["shared_s"] > 0 and sw["independent_s"] > 0

    # The printed table has a row per configuration, and the markdown file holds the same table.
    for name in recs:
        assert f"| {name} |" in printed
    assert "loop it/s" in printed and "GBSD sweep" in printed
    assert md.read_text().strip() == printed.strip()
    print(f"bench smoke test: {time.perf_counter() - t0:.1f}s")


def test_interleaved_step_timing(tmp_path, capsys):
    """--interleave: every configuration built first, then timed round-robin; same records and ratios as a plain run,
    and a failing configuration (CUDA graphs on a CPU) is reported without stopping the others."""
    out = tmp_path / "inter.json"
    rc = main(["--tiny", "--device", "cpu", "--threads", "1", "--steps", "3", "--repeat", "3", "--parts", "step",
               "--interleave", "--configs", "eager,fast,graphs,diffusers", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "interleaved" in printed
    recs = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert list(recs) == ["eager", "fast", "graphs", "diffusers"] and recs["graphs"]["skipped"] == "needs CUDA"
    for name in ("eager", "fast", "diffusers"):
        r = recs[name]
        assert r["complete"] and r["step"]["interleaved"] and len(r["step"]["runs_s"]) == 3
        assert r["step_ms"] == pytest.approx(sorted(r["step"]["runs_s"])[1] * 1e3) and r["warmup_s"] > 0
        assert "text_ms" not in r and "loop_s" not in r
    assert recs["fast"]["step_vs_diffusers"] == pytest.approx(recs["diffusers"]["step_ms"] / recs["fast"]["step_ms"])
    with pytest.raises(SystemExit):
        main(["--interleave", "--parts", "step,loop"])
    assert "--parts step" in capsys.readouterr().err


def test_interleaved_sdxl_steps(tmp_path, capsys):
    """--arch sdxl --interleave: diffusers' step gets SDXL's pooled embeddings and size ids there too (it used to
    call encode_prompt positionally, which StableDiffusionXLPipeline reads as prompt_2, and fail)."""
    out = tmp_path / "xl-inter.json"
    rc = main(["--arch", "sdxl", "--tiny", "--device", "cpu", "--threads", "1", "--steps", "3", "--repeat", "2",
               "--parts", "step", "--interleave", "--configs", "fast,diffusers", "--json", str(out)])
    capsys.readouterr()
    assert rc == 0
    for r in json.loads(out.read_text())["results"]:
        assert r["complete"] and "error" not in r and r["arch"] == "sdxl" and r["step"]["interleaved"]
    assert r["step_ms"] > 0


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["--configs", "eager,warp-speed"])
    assert "warp-speed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--sweep", "diffusers"])  # GBSD is ours only


def test_sdxl_tiny_run_and_its_two_steps_compute_the_same(tmp_path, capsys):
    """--arch sdxl: ours and diffusers' StableDiffusionXLPipeline run and are compared in one table; the step each
    side times is the same computation (the same x_{t-1} from the same seeded weights: the pooled embeddings and size
    ids diffusers gets are the ones our conditioning holds), and the FLOPs are SDXL's."""
    import torch

    from bench.flops import step_flops
    from bench.models import build_bundle
    from bench.reference_sdxl import diffusers_sdxl_pipeline
    from bench.run import (
        NEGATIVE,
        PROMPT,
        Settings,
        diffusers_added_cond,
        diffusers_negative,
        diffusers_step_call,
        make_inputs,
        ours_contexts,
        ours_step_call,
    )
    from gbsd_core.sampling import CFGStep

    out = tmp_path / "xl.json"
    rc = main(["--arch", "sdxl", "--tiny", "--device", "cpu", "--threads", "1", "--steps", "3", "--repeat", "1",
               "--parts", "step,loop,text,vae", "--configs", "fast,diffusers", "--json", str(out)])
    capsys.readouterr()
    assert rc == 0
    recs = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    for r in recs.values():
        assert r["complete"] and r["arch"] == "sdxl" and r["size"] == 64 and "error" not in r
        assert r["flops_per_step"] == step_flops("sdxl", True, 64, 1, 7.5) and r["loop_it_s"] > 0
    assert recs["fast"]["step_vs_diffusers"] > 0

    s = Settings(arch="sdxl", device=torch.device("cpu"), dtype=torch.float32, size=64, steps=3, cfg=7.5, batch=1,
                 repeat=1, warmup=0, loop_repeat=1, e2e_repeat=0, tiny=True, seed=0, compile_mode=None)
    bundle = build_bundle("sdxl", "cpu", torch.float32, tiny=True, seed=0)
    pipe = diffusers_sdxl_pipeline(bundle, tmp_path)
    assert NEGATIVE == "" and diffusers_negative(pipe) is None  # both sides: zeros for the empty negative prompt
    with torch.inference_mode():
        uncond, cond = ours_contexts(bundle, s, torch.float32)
        x_T = make_inputs(s, torch.float32)
        ours = ours_step_call(CFGStep(bundle.unet, (ddim := model_ddim(bundle)), 7.5), uncond, cond, x_T,
                              ddim.timesteps(3), s)()[0]
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=None)
        added = diffusers_added_cond((npooled, pooled), s, pe.dtype)
        theirs = diffusers_step_call(pipe.unet, pipe.scheduler, pe, npe, x_T, s, added)()
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"bench SDXL step, ours vs diffusers: rel err {err:.1e}")
    assert err <= 1e-5


def test_per_sampler_loops(tmp_path, capsys):
    """--samplers: each of our configurations times the loop of every sampler (fast: through the fast stepper of that
    sampler), round-robin; the figures are consistent and the table says how a step compares to DDIM's."""
    out = tmp_path / "samplers.json"
    rc = main(["--tiny", "--device", "cpu", "--threads", "1", "--steps", "3", "--repeat", "2", "--parts", "loop",
               "--configs", "eager,fast", "--samplers", "ddim,euler,euler_a,dpmpp_2m", "--schedule", "karras",
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    for r in json.loads(out.read_text())["results"]:
        loops = r["samplers"]
        assert list(loops) == ["ddim", "euler", "euler_a", "dpmpp_2m"]
        assert [t["schedule"] for t in loops.values()] == ["normal", "karras", "karras", "karras"]
        for t in loops.values():
            assert len(t["runs_s"]) == 1 and t["median_s"] == t["runs_s"][0] > 0
            assert t["loop_it_s"] == pytest.approx(3 / t["median_s"]) and t["step_ms"] == pytest.approx(
                1e3 * t["median_s"] / 3)
            assert t["x_ddim"] == pytest.approx(t["step_ms"] / loops["ddim"]["step_ms"])
        assert loops["ddim"]["x_ddim"] == 1.0
    assert "Per-sampler denoise loop" in printed and "| fast | float32 | 64 | 1 | dpmpp_2m | karras | 3 |" in printed
    for bad in (["--samplers", "heun"], ["--samplers", "ddim", "--parts", "step"]):
        with pytest.raises(SystemExit):
            main(["--tiny", *bad])
    assert "--samplers" in capsys.readouterr().err


# Every flag through argparse: a bad value is one line, exit status 2, before anything is built or written.
BAD_FLAGS = [
    (["--dtype", "fp64"], "--dtype"), (["--dtype", "fp16,,fp32"], "--dtype"), (["--vae-dtype", "fp8"], "--vae-dtype"),
    (["--device", "nope"], "--device"), (["--device", "meta"], "--device"), (["--device", "cuda:99"], "--device"),
    (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"), (["--threads", "two"], "--threads"),
    (["--sweep-k", "0"], "--sweep-k"), (["--repeat", "0"], "--repeat"), (["--warmup", "-1"], "--warmup"),
    (["--loop-repeat", "0"], "--loop-repeat"), (["--e2e-repeat", "-1"], "--e2e-repeat"),
    (["--cfg", "nan"], "--cfg"), (["--cfg", "inf"], "--cfg"), (["--cfg", "-1"], "--cfg"), (["--cfg", "1e9"], "--cfg"),
    (["--steps", "0"], "--steps"), (["--steps", "1001"], "--steps"), (["--steps", "1000"], "t=1000"),
    (["--steps", "2.5"], "--steps"), (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"),
    (["--size", "60"], "--size"), (["--size", "0"], "--size"), (["--size", "99992"], "--size"),
    (["--batch", "0"], "--batch"), (["--batch", "1,x"], "--batch"),
    (["--sweep-layout", "nan"], "--sweep-layout"), (["--sweep-layout", "1.5"], "--sweep-layout"),
    (["--sweep-size", "12"], "--sweep-size"), (["--sweep-size", "0"], "--sweep-size"),
    (["--sweep-steps", "0"], "--sweep-steps"), (["--compile-mode", "fast"], "--compile-mode"),
    (["--configs", "eager,,fast"], "configuration"), (["--parts", "loop,nap"], "part"),
    (["--samplers", "dpmpp_2m", "--parts", "loop", "--steps", "999"], "--steps 999"),
    (["--schedule", "exponential"], "--schedule"), (["--arch", "sd3"], "--arch"),
    (["--sweep-independent", "guess"], "--sweep-independent"),
    (["--json", "{tmp}/a-file/out.json"], "not a folder"), (["--json", "{tmp}"], "--json"),
    (["--markdown", "/proc/no/such/t.md"], "--markdown"), (["--json", "{tmp}/" + "j" * 300 + ".json"], "too long"),
]


@pytest.mark.parametrize("argv, needle", BAD_FLAGS, ids=[" ".join(a)[:40] for a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_in_one_line_before_anything_runs(argv, needle, tmp_path, capsys, monkeypatch):
    """The flags once gave tracebacks (--dtype fp64, --device nope, --threads -1), or ran and printed a table of
    nothing (--sweep-k 0: 0.00x) or figures for no timed call (--repeat 0), or figures with CFG NaN."""
    (tmp_path / "a-file").write_text("x")
    import bench.__main__ as bench_main

    monkeypatch.setattr(bench_main, "run", lambda args: pytest.fail("ran past the flag check"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    print(err.strip())
    assert exc.value.code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fair_flags_are_accepted(tmp_path, monkeypatch):
    """What the checks must let through: the edges of each range, a new --json folder, several dtypes."""
    import bench.__main__ as bench_main

    seen = []
    monkeypatch.setattr(bench_main, "run", lambda args: seen.append(args) or 0)
    assert main(["--tiny", "--cfg", "0", "--steps", "999", "--seed", str(2**64 - 1), "--warmup", "0", "--e2e-repeat",
                 "0", "--sweep-layout", "1", "--sweep-k", "1", "--dtype", "fp32,bf16", "--size", "64,2048",
                 "--json", str(tmp_path / "new" / "r.json"), "--compile-mode", "max-autotune-no-cudagraphs"]) == 0
    args = seen[0]
    assert (args.cfg, args.steps, args.seed, args.dtype, args.size) == (0.0, 999, 2**64 - 1, "fp32,bf16", [64, 2048])
    assert not (tmp_path / "new").exists()  # probed, not made, until the run writes


def test_sigterm_during_a_run_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """A real SIGTERM while the JSON is being written: the run unwinds as on Ctrl-C (report.write is atomic), one
    line, exit 143 (Python's default action ended the process there and left the .tmp)."""
    import os
    import signal

    import bench.__main__ as bench_main
    from bench.report import write

    def run(args):
        write(args.json, {"results": []})

        def half_then_term(tmp):
            tmp.write_text('{"results": [')
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (the main) thread before the call returns
            tmp.write_text("never")

        from gbsd_core.loading import atomic_write

        atomic_write(args.json, half_then_term)
        return 0

    monkeypatch.setattr(bench_main, "run", run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--tiny", "--json", str(tmp_path / "r.json")]) == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the first, whole write only; no .tmp
    assert "SIGTERM" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) == before
