"""`gbsd grid`: α × layout-fraction contact sheets, one sweep per layout fraction, with target/background sharpness
per cell."""
from __future__ import annotations

import json

import pytest
from _cli import bomb_png, broken_zlib_png
from PIL import Image

from gbsd_core import pipeline
from gbsd_core.cli.main import main as cli_main


def test_grid_contact_sheets(amp_ckpt, tmp_path, monkeypatch, capsys):
    calls = []
    real = pipeline.sweep
    monkeypatch.setattr(pipeline, "sweep", lambda *a, **k: calls.append(k["alphas"]) or real(*a, **k))
    out = tmp_path / "grid"
    argv = ["grid", "a bunny and a carrot on grass", "--focus", "a carrot", "--alphas", "0,1", "--layouts", "0.5,0.75",
            "--steps", "4", "--size", "64x64", "--weights", str(amp_ckpt), "-o", str(out), "-q"]
    assert cli_main(argv) == 0
    assert [list(c) for c in calls] == [[0.0, 1.0], [0.0, 1.0]]  # one sweep per layout fraction, the α values sharing its layout stage
    for name in ("grid.png", "grid_overlay.png", "grid_heatmap.png"):
        w, h = Image.open(out / name).size
        assert w > 2 * 64 and h > 2 * 64
    cells = json.loads((out / "grid.json").read_text())["cells"]
    assert [(c["alpha"], c["layout"]) for c in cells] == [(0.0, 0.5), (0.0, 0.75), (1.0, 0.5), (1.0, 0.75)]
    assert len({c["target"]["laplacian_var"] for c in cells}) == 4


def test_grid_runs_the_chosen_sampler(amp_ckpt, tmp_path, monkeypatch, capsys):
    seen = []
    real = pipeline.sweep
    monkeypatch.setattr(pipeline, "sweep", lambda b, p, **k: seen.append((p.sampler, p.schedule)) or real(b, p, **k))
    out = tmp_path / "grid"
    argv = ["grid", "a bunny and a carrot on grass", "--focus", "a carrot", "--alphas", "0,1", "--layouts", "0.5",
            "--steps", "4", "--size", "64x64", "--sampler", "euler_a", "--schedule", "karras", "--weights",
            str(amp_ckpt), "-o", str(out), "-q"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert seen == [("euler_a", "karras")]
    data = json.loads((out / "grid.json").read_text())
    assert (data["sampler"], data["schedule"], data["steps"]) == ("euler_a", "karras", 4)


def test_grid_layout_fraction_one_takes_its_masks_from_the_other_cells(amp_ckpt, tmp_path, capsys):
    """A layout fraction of 1 is plain SD on the global prompt (no focus stage, so no attention map of its own): each
    row's cell at 1 is measured on the mask of the same row's nearest layout fraction with a focus stage."""
    out = tmp_path / "grid"
    argv = ["grid", "a bunny and a carrot on grass", "--focus", "a carrot", "--alphas", "0,1", "--layouts", "0.5,1",
            "--steps", "4", "--size", "64x64", "--weights", str(amp_ckpt), "-o", str(out), "-q"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    cells = {(c["alpha"], c["layout"]): c for c in json.loads((out / "grid.json").read_text())["cells"]}
    for a in (0.0, 1.0):
        assert 0 < cells[(a, 1.0)]["mask_fraction"] == cells[(a, 0.5)]["mask_fraction"] < 1
    w, _ = Image.open(out / "grid.png").size
    assert w > 2 * 64  # both columns drawn


GRID_BAD = [
    (["--layouts", "1"], "no focus stage"),  # and no --mask / --box: no cell has a mask to lend
    # (0.9 of 4 steps is 3 + 1 since each stage keeps a step at few steps: tests/test_few_step.py)
    (["--box", "0,0,inf,10"], "--box"),
    (["--box", "nan,0,10,10"], "--box"),
    (["--box", "0,0,10"], "--box"),
    (["--box", "10,10,5,5"], "empty"),
    (["--box", "100,100,200,200"], "lies outside"),  # found before the cells are computed
    (["--mask", "{small}"], "32x32"),
    (["--mask", "{bomb}"], "pixels"),
    (["--mask", "{zlib}"], "not a readable image"),
    (["--mask", "{tmp}"], "not a regular file"),
    (["--mask", "{small}", "--box", "0,0,4,4"], "not both"),
    (["--alphas", "0,nan"], "--alphas"),
    (["--layouts", "inf"], "--layouts"),
    (["--layouts", "0.5,1.5"], "--layouts"),
    (["--steps", "0"], "steps"),
    (["--steps", "1000"], "steps"),
    (["--cfg", "nan"], "cfg"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**64)], "seed"),
    (["--size", "60x64"], "multiple of 8"),
    (["--size", "4096x4096"], "--size"),
    (["--focus", ""], "focus"),
    (["-o", "{file}"], "-o"),
    (["-o", "{long}"], "too long"),
    (["--device", "meta"], "--device"),
    (["--sampler", "heun"], "sampler must be one of"),
    (["--schedule", "karras"], "for the σ samplers"),
    (["--sampler", "dpmpp_2m", "--steps", "999"], "t=1000"),
]


@pytest.mark.parametrize("argv, match", GRID_BAD, ids=[" ".join(a) for a, _ in GRID_BAD])
def test_grid_bad_input_is_refused_before_loading(argv, match, amp_ckpt, tmp_path, capsys, no_load):
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    bomb_png(tmp_path / "bomb.png")
    broken_zlib_png(tmp_path / "zlib.png")
    (tmp_path / "file").write_text("x")
    subs = {"{small}": tmp_path / "small.png", "{bomb}": tmp_path / "bomb.png", "{zlib}": tmp_path / "zlib.png",
            "{tmp}": tmp_path, "{file}": tmp_path / "file", "{long}": tmp_path / ("x" * 300)}
    argv = [str(subs.get(a, a)) for a in argv]
    base = ["grid", "a bunny and a carrot", "--focus", "a carrot", "--steps", "4", "--size", "64x64", "-q",
            "--weights", str(amp_ckpt), "-o", str(tmp_path / "grid")]
    code = cli_main([*base, *argv])
    err = capsys.readouterr().err
    print(err)
    assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "grid").exists()
