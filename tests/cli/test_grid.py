"""`gbsd grid`: α × σ contact sheets, one sweep per σ, with target/background sharpness per cell."""
from __future__ import annotations

import json

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
    assert [list(c) for c in calls] == [[0.0, 1.0], [0.0, 1.0]]  # one sweep per σ, the α values sharing its layout stage
    for name in ("grid.png", "grid_overlay.png", "grid_heatmap.png"):
        w, h = Image.open(out / name).size
        assert w > 2 * 64 and h > 2 * 64
    cells = json.loads((out / "grid.json").read_text())["cells"]
    assert [(c["alpha"], c["layout"]) for c in cells] == [(0.0, 0.5), (0.0, 0.75), (1.0, 0.5), (1.0, 0.75)]
    assert len({c["target"]["laplacian_var"] for c in cells}) == 4
    capsys.readouterr()
    assert cli_main([*argv[:6], "--layouts", "0.8,1"]) == 2
    assert "no focus stage" in capsys.readouterr().err
