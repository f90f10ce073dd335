"""`gbsd eval` / `gbsd grid` end to end on the tiny random checkpoint: files and table, metrics vs OpenCV, resume,
image-to-image mode, the torchrun path (2 gloo processes on loopback) against one process, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from _cli import EVAL_ARGS, PAIRS
from PIL import Image

import gbsd_core
from gbsd_core import pipeline
from gbsd_core.bokeh.attnmaps import CrossAttentionCollector, word_positions
from gbsd_core.cli.main import main as cli_main
from gbsd_core.pipeline import GenerationParams


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_end_to_end_files_metrics_and_table(single_run, amp_ckpt, pairs_file):
    out = single_run
    recs = _records(out)
    assert [r["id"] for r in recs] == ["001-a-carrot", "002-a-cat", "with-mask"]
    assert [r["mask_source"] for r in recs] == ["attention", "box", "file"]
    for r in recs:
        d = out / "pairs" / r["id"]
        for name in ("sd", "gbsd", "mask", "overlay", "heatmap_sd", "heatmap_gbsd"):
            assert Image.open(d / f"{name}.png").size == (64, 64)
        mask = np.asarray(Image.open(d / "mask.png")) > 0
        for image in ("sd", "gbsd"):
            # Independent check with OpenCV: variance of the Laplacian and Tenengrad over the mask and outside it.
            gray = cv2.cvtColor(np.asarray(Image.open(d / f"{image}.png")), cv2.COLOR_RGB2GRAY).astype(np.float64)
            lap = cv2.Laplacian(gray, cv2.CV_64F)
            ten = cv2.Sobel(gray, cv2.CV_64F, 1, 0) ** 2 + cv2.Sobel(gray, cv2.CV_64F, 0, 1) ** 2
            for region, m in (("target", mask), ("background", ~mask)):
                got = r["metrics"][image][region]
                assert got["laplacian_var"] == pytest.approx(lap[m].var(), rel=1e-9)
                assert got["tenengrad"] == pytest.approx(ten[m].mean(), rel=1e-9)
    # Box and file masks are the given regions.
    assert (np.asarray(Image.open(out / "pairs/002-a-cat/mask.png")) > 0).sum() == 32 * 40
    assert np.array_equal(np.asarray(Image.open(out / "pairs/with-mask/mask.png")) > 0,
                          np.asarray(Image.open(pairs_file.parent / "m.png")) > 0)

    # The baseline is plain SD from the same seed; GBSD's mask is its own run's attention map.
    bundle = gbsd_core.load(amp_ckpt)
    p = PAIRS[0]
    params = GenerationParams(p["prompt"], focus=p["focus"], seed=p["seed"], steps=4, layout=0.5, width=64, height=64)
    collector = CrossAttentionCollector(bundle.unet, word_positions(bundle.tokenizer(p["focus"])))
    gbsd = pipeline.generate(bundle, params, probe=collector).image
    plain = pipeline.generate(bundle, GenerationParams(p["prompt"], seed=p["seed"], steps=4, width=64, height=64)).image
    d = out / "pairs" / recs[0]["id"]
    assert np.array_equal(np.asarray(Image.open(d / "gbsd.png")), np.asarray(gbsd))
    assert np.array_equal(np.asarray(Image.open(d / "sd.png")), np.asarray(plain))
    assert np.array_equal(np.asarray(Image.open(d / "mask.png")) > 0, collector.mask(0, (64, 64)))

    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * len(PAIRS)
    table = (out / "table.md").read_text()
    print(table)
    vol = [np.mean([r["metrics"][im]["target"]["laplacian_var"] for r in recs]) for im in ("sd", "gbsd")]
    assert f"| VoL | target | {vol[0]:.2f} | {vol[1]:.2f} | {vol[1] / vol[0]:.2f}x | 95.53 | 3.81x |" in table
    assert "| 1.94e+06 | 3.10x |" in table and "mean over 3 pairs" in table


def test_resume_skips_finished_pairs(single_run, amp_ckpt, pairs_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(single_run, out)
    calls = []
    real = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    argv = ["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), *EVAL_ARGS]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pairs").rglob("*.png")}
    assert cli_main(argv) == 0
    assert calls == []
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "pairs").rglob("*.png")}
    (out / "pairs" / "002-a-cat" / "record.json").unlink()
    assert cli_main(argv) == 0
    assert [c.focus for c in calls] == ["a cat", None]  # that pair's GBSD and plain-SD runs, nothing else
    assert (out / "table.md").read_text() == (single_run / "table.md").read_text()
    capsys.readouterr()
    assert cli_main([*argv, "--alpha", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "alpha" in err
    assert cli_main([*argv, "--sampler", "euler"]) == 2  # a folder holds one sampler's table
    err = capsys.readouterr().err
    assert "other settings" in err and "sampler: 'ddim' there, 'euler' now" in err
    # A run.json from before the sampler was recorded is DDIM's: it resumes as DDIM, and refuses another sampler.
    run = json.loads((out / "run.json").read_text())
    assert (run["sampler"], run["schedule"]) == ("ddim", "normal")
    (out / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k not in ("sampler", "schedule")}))
    calls.clear()
    assert cli_main(argv) == 0 and calls == []
    assert cli_main([*argv, "--sampler", "dpmpp_2m", "--schedule", "karras"]) == 2
    assert "sampler: 'ddim' there, 'dpmpp_2m' now" in capsys.readouterr().err


def test_eval_with_another_sampler_records_it(amp_ckpt, pairs_file, tmp_path, monkeypatch, capsys):
    seen = []
    real = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda b, p, **k: seen.append((p.sampler, p.schedule, p.focus))
                        or real(b, p, **k))
    out = tmp_path / "dpmpp"
    argv = ["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), "--limit", "1", "--sampler",
            "dpmpp_2m", "--schedule", "karras", *EVAL_ARGS]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert seen == [("dpmpp_2m", "karras", "a carrot"), ("dpmpp_2m", "karras", None)]  # GBSD and its baseline
    run = json.loads((out / "run.json").read_text())
    assert (run["sampler"], run["schedule"], run["steps"]) == ("dpmpp_2m", "karras", 4)
    assert (out / "table.md").read_text().startswith("# Bokeh evaluation: ") and \
        "4 DPM++ 2M Karras steps" in (out / "table.md").read_text().splitlines()[0]


def test_img2img_mode_measures_output_against_input(single_run, amp_ckpt, pairs_file, tmp_path):
    out = tmp_path / "i2i"
    argv = ["eval", str(pairs_file), "--init-dir", str(single_run), "--limit", "1", "--strength", "0.75",
            "-o", str(out), "--weights", str(amp_ckpt), *EVAL_ARGS]
    assert cli_main(argv) == 0
    (rec,) = _records(out)
    assert rec["mode"] == "img2img" and rec["baseline"] == "input" and rec["mask_source"] == "attention"
    d = out / "pairs" / rec["id"]
    assert np.array_equal(np.asarray(Image.open(d / "input.png")),
                          np.asarray(Image.open(single_run / "pairs" / rec["id"] / "sd.png")))
    table = (out / "table.md").read_text()
    assert "Image to image" in table and "1.73x" in table and "Text to image" not in table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_give_the_same_table(single_run, amp_ckpt, pairs_file, tmp_path):
    out = tmp_path / "dist"
    # TMPDIR: torchrun's agent makes a torchelastic_* folder there and leaves it behind
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "",
           "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "gbsd_core.cli.eval", str(pairs_file), "-o", str(out),
           "--weights", str(amp_ckpt), "--device", "cpu", *EVAL_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stderr and "[rank 1]" in proc.stderr  # the second rank did a pair
    assert (out / "table.md").read_text() == (single_run / "table.md").read_text()
    assert _records(out) == _records(single_run)
    for p in (single_run / "pairs").rglob("*.png"):
        assert (out / p.relative_to(single_run)).read_bytes() == p.read_bytes(), p




# ------------------------------------------------------------------------------------------------ hostile folders


def _damage_run_json(out: Path) -> None:
    (out / "run.json").write_text('{"model": "tiny-respons')


def _damage_pairs_folder(out: Path) -> None:
    shutil.rmtree(out / "pairs")
    (out / "pairs").write_text("a file where the pairs folder goes")


def _damage_pair_folder(out: Path) -> None:
    shutil.rmtree(out / "pairs" / "002-a-cat")
    (out / "pairs" / "002-a-cat").write_text("a file where a pair's folder goes")


def _damage_record_is_folder(out: Path) -> None:
    (out / "pairs" / "002-a-cat" / "record.json").unlink()
    (out / "pairs" / "002-a-cat" / "record.json").mkdir()


def _damage_table_is_folder(out: Path) -> None:
    (out / "table.md").unlink()
    (out / "table.md").mkdir()


@pytest.mark.parametrize("damage, match", [
    (_damage_run_json, "run.json"), (_damage_pairs_folder, "pairs"), (_damage_pair_folder, "002-a-cat"),
    (_damage_record_is_folder, "record.json"), (_damage_table_is_folder, "table.md"),
])
def test_a_damaged_output_folder_is_refused_before_loading(damage, match, single_run, pairs_file, amp_ckpt, tmp_path,
                                                           capsys, no_load):
    out = tmp_path / "out"
    shutil.copytree(single_run, out)
    damage(out)
    code = cli_main(["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), *EVAL_ARGS])
    err = capsys.readouterr().err
    print(err)
    assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("content", ['{"id": "002-a-c', "[1, 2]", '"text"', '{"id": "002-a-cat"}'])
def test_a_truncated_record_reruns_its_pair(content, single_run, pairs_file, amp_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(single_run, out)
    (out / "pairs" / "002-a-cat" / "record.json").write_text(content)
    calls = []
    real = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert cli_main(["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), *EVAL_ARGS]) == 0
    assert [c.focus for c in calls] == ["a cat", None]  # that pair again, nothing else
    assert (out / "table.md").read_text() == (single_run / "table.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--size", "48x48"], "m.png is 64x64"),  # the mask of line 3 no longer fits: found before any weights load
    (["--size", "8x8", "--limit", "2"], "lies outside"),  # the box of line 2
    (["--size", "60x64"], "multiple of 8"),
    (["--size", "99992x99992"], "--size"),
    (["--cfg", "nan"], "cfg"),
    (["--steps", "1000"], "steps"),
    (["--alpha", "inf"], "alpha"),
    (["--negative", "a\0b"], "negative"),
    (["-o", "{long}"], "too long"),
    (["-o", "{file}"], "not a folder"),
    (["--device", "meta"], "--device"),
    (["--sampler", "heun"], "sampler must be one of"),
    (["--sampler", "euler", "--schedule", "exponential"], "schedule must be one of"),
    (["--schedule", "karras"], "for the σ samplers"),
    (["--sampler", "dpmpp_2m", "--steps", "999"], "t=1000"),
])
def test_bad_flags_are_refused_before_loading(argv, match, pairs_file, amp_ckpt, tmp_path, capsys, no_load):
    (tmp_path / "file").write_text("x")
    argv = [str(tmp_path / ("x" * 300)) if a == "{long}" else str(tmp_path / "file") if a == "{file}" else a
            for a in argv]
    base = ["eval", str(pairs_file), "--weights", str(amp_ckpt), "-q", "--steps", "4"]
    if "-o" not in argv:
        base += ["-o", str(tmp_path / "out")]
    code = cli_main([*base, *argv])
    err = capsys.readouterr().err
    print(err)
    assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "pairs").exists()


def test_an_input_image_the_vae_cannot_take_is_refused_before_loading(amp_ckpt, tmp_path, capsys, no_load):
    """image to image at the input's own size: 60 is not a multiple of the VAE's 8 (fine with --size, resized)."""
    Image.new("RGB", (60, 64), (9, 9, 9)).save(tmp_path / "in60.png")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "focus": "b", "seed": 1, "init": "in60.png"}\n')
    code = cli_main(["eval", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "out"), "--weights", str(amp_ckpt), "-q"])
    err = capsys.readouterr().err
    print(err)
    assert code == 2 and "not a multiple of 8" in err and err.count("\n") == 1
