"""`gbsd rack` end to end on the tiny model that listens to its context: the files it writes, their metadata, and
`--from-png` on a frame (generate) or the sheet (rack) reproducing them. (Bad input: test_generate.py's table.)"""
from __future__ import annotations

import json
import os

import numpy as np
from _cli import png_texts, run_cli
from PIL import Image

from gbsd_core import pipeline
from gbsd_core.cli import pngmeta

RACK = ["rack", "a bunny and a carrot in a garden, bokeh", "--from", "a bunny", "--to", "a carrot", "--frames", "4",
        "--steps", "6", "--layout", "0.5", "--seed", "1", "--size", "64x64", "-q"]


def px(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_rack_writes_animation_sheet_and_frames(amp_ckpt, tmp_path, capsys, monkeypatch):
    calls = []
    real = pipeline.sweep
    monkeypatch.setattr(pipeline, "sweep", lambda *a, **k: calls.append(k["mixes"]) or real(*a, **k))
    code, out, err = run_cli([*RACK, "--weights", amp_ckpt, "-o", tmp_path / "rack.webp"], capsys)
    assert code == 0, err
    assert calls == [[0.0, 1 / 3, 2 / 3, 1.0]]  # one batched sweep over the four mixes
    names = ["rack_00.png", "rack_01.png", "rack_02.png", "rack_03.png", "rack_sheet.png", "rack.webp"]
    assert out.split() == [str(tmp_path / n) for n in names]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    with Image.open(tmp_path / "rack.webp") as im:
        assert im.n_frames == 4 and im.size == (64, 64)
    for k in range(4):
        p = pngmeta.read_params(tmp_path / f"rack_{k:02d}.png")
        assert (p.focus, p.focus_to, p.focus_mix, p.layout) == ("a bunny", "a carrot", k / 3, 0.5)
        assert json.loads(png_texts(tmp_path / f"rack_{k:02d}.png")["gbsd"])["rack"] == {"frame": k, "frames": 4}
    sheet = json.loads(png_texts(tmp_path / "rack_sheet.png")["gbsd"])
    assert sheet["params"]["focus_mix"] == 0.0 and sheet["rack"]["mixes"] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert set(sheet["rack"]["mask_fraction"]) == {"a bunny", "a carrot"}
    assert all(set(s) == {"a bunny", "a carrot"} for s in sheet["rack"]["sharpness"])
    assert not np.array_equal(px(tmp_path / "rack_00.png"), px(tmp_path / "rack_03.png"))


def test_from_png_reproduces_a_frame_and_the_whole_rack(amp_ckpt, tmp_path, capsys):
    assert run_cli([*RACK, "--weights", amp_ckpt, "-o", tmp_path / "rack.gif"], capsys)[0] == 0
    for k in (1, 3):  # generate --from-png on a frame: that frame alone (batch 1 vs the rack's batch: ≤ 1/255)
        again = tmp_path / f"again_{k}.png"
        code, _, err = run_cli(["generate", "--from-png", tmp_path / f"rack_{k:02d}.png", "--weights", amp_ckpt,
                                "-q", "-o", again], capsys)
        assert code == 0, err
        assert np.abs(px(again) - px(tmp_path / f"rack_{k:02d}.png")).max() <= 1
        assert pngmeta.read_params(again) == pngmeta.read_params(tmp_path / f"rack_{k:02d}.png")
    # rack --from-png on the sheet: the same rack (frames count from the sheet's "rack" entry).
    _rack_again_from_the_sheet(amp_ckpt, tmp_path, capsys, frames=4)
    with Image.open(tmp_path / "rack.gif") as im:
        assert im.n_frames == 4


def test_rack_with_another_sampler_records_and_reproduces_it(amp_ckpt, tmp_path, capsys):
    """--sampler / --schedule reach the rack's sweep (Euler a's noise shared by the frames' branches) and every PNG;
    the sheet's --from-png runs the same sampler again."""
    argv = [*RACK, "--frames", "2", "--sampler", "euler_a", "--schedule", "karras", "--weights", amp_ckpt]
    assert run_cli([*argv, "-o", tmp_path / "rack.webp"], capsys)[0] == 0
    for name in ("rack_00.png", "rack_01.png", "rack_sheet.png"):
        p = pngmeta.read_params(tmp_path / name)
        assert (p.sampler, p.schedule) == ("euler_a", "karras")
        assert "Sampler: Euler a, Schedule type: Karras" in png_texts(tmp_path / name)["parameters"]
    _rack_again_from_the_sheet(amp_ckpt, tmp_path, capsys, frames=2)


def _rack_again_from_the_sheet(ckpt, tmp_path, capsys, frames: int) -> None:
    """`gbsd rack --from-png rack_sheet.png` into re/: every frame equals the first rack's."""
    (tmp_path / "re").mkdir()
    code, _, err = run_cli(["rack", "--from-png", tmp_path / "rack_sheet.png", "--weights", ckpt, "-q",
                            "-o", tmp_path / "re" / "r.webp"], capsys)
    assert code == 0, err
    for k in range(frames):
        assert np.array_equal(px(tmp_path / "re" / f"r_{k:02d}.png"), px(tmp_path / f"rack_{k:02d}.png"))


def test_the_animation_holds_every_frame_exactly(amp_ckpt, tmp_path, capsys, monkeypatch):
    """Frame k of rack.webp is rack_k.png pixel for pixel, also when the frames differ by a level or two (the
    subtle focus changes a rack exists to show): lossy WebP once wrote such racks as one still frame."""
    from gbsd_core.bokeh.rack import Rack

    real = Rack.images
    # the tiny model's frames differ a lot; make frames 1..3 frame 0 plus 1, 2 and 3 levels in one corner
    def subtle(self):
        first = np.asarray(real(self)[0], dtype=np.int16)
        out = []
        for k in range(len(self.frames)):
            arr = first.copy()
            arr[:8, :8] = np.clip(arr[:8, :8] + k, 0, 255)
            out.append(Image.fromarray(arr.astype(np.uint8)))
        return out

    for images in (real, subtle):
        monkeypatch.setattr(Rack, "images", images)
        out = tmp_path / images.__name__
        out.mkdir()
        code, _, err = run_cli([*RACK, "--weights", amp_ckpt, "-o", out / "rack.webp"], capsys)
        assert code == 0, err
        assert "merged" not in err
        with Image.open(out / "rack.webp") as im:
            assert im.n_frames == 4
            for k in range(4):
                im.seek(k)
                want = px(out / f"rack_{k:02d}.png")  # the frame's PNG: a real frame
                if images is subtle:  # or frame 0's plus k levels in the corner
                    want = px(out / "rack_00.png")
                    want[:8, :8] = np.clip(want[:8, :8] + k, 0, 255)
                assert np.array_equal(np.asarray(im.convert("RGB"), dtype=np.int16), want), (images.__name__, k)


def test_a_gif_that_merges_frames_says_so(amp_ckpt, tmp_path, capsys, monkeypatch):
    """GIF's 256 colours can make nearly equal frames identical, and the writer merges them: the command warns
    (the frame PNGs hold every frame) rather than leaving a shorter animation unexplained."""
    from gbsd_core.bokeh.rack import Rack

    real = Rack.images
    monkeypatch.setattr(Rack, "images", lambda self: [real(self)[0]] * 3 + [real(self)[3]])
    code, _, err = run_cli([*RACK, "--weights", amp_ckpt, "-o", tmp_path / "rack.gif"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "rack.gif") as im:
        assert im.n_frames == 2
    assert "warning" in err and "2 of the 4 frames" in err and ".webp" in err
