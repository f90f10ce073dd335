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
import torch
from PIL import Image

import gbsd_core
from gbsd_core import cli, pipeline
from gbsd_core.attnmaps import CrossAttentionCollector, word_positions
from gbsd_core.eval import DEFAULT_PAIRS, read_pairs
from gbsd_core.pipeline import GenerationParams

PAIRS = [
    {"prompt": "a bunny and a carrot on grass", "focus": "a carrot", "seed": 1},
    {"prompt": "a cat and a dog on a sofa", "focus": "a cat", "seed": 2, "box": [8, 8, 40, 48]},
    {"id": "with-mask", "prompt": "a cup and a croissant on a table", "focus": "a cup", "seed": 3, "mask": "m.png"},
]
ARGS = ["--size", "64x64", "--steps", "4", "--layout", "0.5", "-q"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The torchrun ranks run with OMP_NUM_THREADS=1; CPU kernels may round differently with more threads, and the
    # distributed test compares images bit for bit.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def amp_ckpt(responsive_ckpt) -> Path:
    """The tiny checkpoint whose prompts steer the image and whose attention maps have structure (conftest.py)."""
    return responsive_ckpt


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    yy, xx = np.mgrid[:64, :64]
    Image.fromarray((((yy - 30) ** 2 + (xx - 34) ** 2 < 15**2) * 255).astype(np.uint8)).save(d / "m.png")
    path = d / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.fixture(scope="module")
def single_run(amp_ckpt, pairs_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    assert cli.main(["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), *ARGS]) == 0
    return out


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_shipped_pairs_parse():
    pairs = read_pairs(DEFAULT_PAIRS)
    assert len(pairs) >= 24 and len({p.id for p in pairs}) == len(pairs)
    for p in pairs:  # the focus object is one of the global prompt's objects
        assert p.focus.split(" ", 1)[1] in p.prompt


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
    gbsd = pipeline.generate(bundle, params, attention=collector).image
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
    argv = ["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), *ARGS]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pairs").rglob("*.png")}
    assert cli.main(argv) == 0
    assert calls == []
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "pairs").rglob("*.png")}
    (out / "pairs" / "002-a-cat" / "record.json").unlink()
    assert cli.main(argv) == 0
    assert [c.focus for c in calls] == ["a cat", None]  # that pair's GBSD and plain-SD runs, nothing else
    assert (out / "table.md").read_text() == (single_run / "table.md").read_text()
    capsys.readouterr()
    assert cli.main([*argv, "--alpha", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "alpha" in err


def test_img2img_mode_measures_output_against_input(single_run, amp_ckpt, pairs_file, tmp_path):
    out = tmp_path / "i2i"
    argv = ["eval", str(pairs_file), "--init-dir", str(single_run), "--limit", "1", "--strength", "0.75",
            "-o", str(out), "--weights", str(amp_ckpt), *ARGS]
    assert cli.main(argv) == 0
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "gbsd_core.eval", str(pairs_file), "-o", str(out),
           "--weights", str(amp_ckpt), "--device", "cpu", *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stderr and "[rank 1]" in proc.stderr  # the second rank did a pair
    assert (out / "table.md").read_text() == (single_run / "table.md").read_text()
    assert _records(out) == _records(single_run)
    for p in (single_run / "pairs").rglob("*.png"):
        assert (out / p.relative_to(single_run)).read_bytes() == p.read_bytes(), p


def test_grid_contact_sheets(amp_ckpt, tmp_path, monkeypatch, capsys):
    calls = []
    real = pipeline.sweep
    monkeypatch.setattr(pipeline, "sweep", lambda *a, **k: calls.append(k["alphas"]) or real(*a, **k))
    out = tmp_path / "grid"
    argv = ["grid", "a bunny and a carrot on grass", "--focus", "a carrot", "--alphas", "0,1", "--layouts", "0.5,0.75",
            "--steps", "4", "--size", "64x64", "--weights", str(amp_ckpt), "-o", str(out), "-q"]
    assert cli.main(argv) == 0
    assert calls == [[0.0, 1.0], [0.0, 1.0]]  # one sweep per σ, the α values sharing its layout stage
    for name in ("grid.png", "grid_overlay.png", "grid_heatmap.png"):
        w, h = Image.open(out / name).size
        assert w > 2 * 64 and h > 2 * 64
    cells = json.loads((out / "grid.json").read_text())["cells"]
    assert [(c["alpha"], c["layout"]) for c in cells] == [(0.0, 0.5), (0.0, 0.75), (1.0, 0.5), (1.0, 0.75)]
    assert len({c["target"]["laplacian_var"] for c in cells}) == 4
    capsys.readouterr()
    assert cli.main([*argv[:6], "--layouts", "0.8,1"]) == 2
    assert "no focus stage" in capsys.readouterr().err


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "focus": "b", "seed": 1}', '{not json'], "line 2: not valid JSON"),
    (['{"prompt": "a", "focus": "b"}'], "line 1: missing field 'seed'"),
    (['{"prompt": "a", "focus": "b", "seed": "7"}'], "'seed' must be an integer"),
    (['{"prompt": "a", "focus": "", "seed": 1}'], "'focus' must be a non-empty string"),
    (['{"prompt": "a", "focsu": "b", "seed": 1}'], "unknown field(s) focsu"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "box": [1, 2, 3]}'], "'box' must be [x0, y0, x1, y1]"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "mask": "m.png", "box": [0, 0, 4, 4]}'], "not both"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "mask": "nope.png"}'], "nope.png: no such file"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "id": "x"}', '{"prompt": "c", "focus": "d", "seed": 1, "id": "x"}'],
     "line 2: id 'x' is used twice"),
    ([], "no pairs"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "mask": "small.png"}'], "small.png is 32x32 (W x H) but the images are 64x64"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "box": [70, 0, 90, 10]}'], "lies outside"),
])
def test_bad_input_exits_2_with_a_clear_message(lines, match, amp_ckpt, tmp_path, capsys):
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    rc = cli.main(["eval", str(path), "-o", str(tmp_path / "out"), "--weights", str(amp_ckpt), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err.strip().splitlines()[-1], err  # the error is one line (after any progress line)
    assert not (tmp_path / "out" / "pairs").exists() or not any((tmp_path / "out" / "pairs").iterdir())
