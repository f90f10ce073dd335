"""`python -m bench few-step` (bench/few_step.py) at tiny size: both sides run each steps x batch, the JSON holds
images/s, e2e seconds and the shares of text encoder / UNet / VAE / other (summing to 1), and our batched route makes
the pixels `pipeline.generate` makes. The CPU figures at full size are in bench/RESULTS.md."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from _util import REPO

if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.__main__ import main  # noqa: E402


def test_tiny_few_step_run_reports_images_per_second_and_shares(tmp_path, capsys):
    out = tmp_path / "few.json"
    rc = main(["few-step", "--tiny", "--device", "cpu", "--threads", "1", "--size", "64", "--steps", "1,4",
               "--batch", "1,2", "--repeat", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0 and "| steps | batch | impl | images/s |" in printed
    rec = json.loads(out.read_text())
    assert rec["environment"]["cpu"] and rec["recipe"] == "Euler a, trailing, guidance off"
    got = {(r["impl"], r["steps"], r["batch"]) for r in rec["results"]}
    assert got == {(impl, n, b) for impl in ("ours", "diffusers") for n in (1, 4) for b in (1, 2)}
    for r in rec["results"]:
        assert len(r["calls"]) == 2 and r["size"] == 64
        assert math.isclose(r["images_s"], r["batch"] / r["e2e_s"])
        assert set(r["shares"]) == {"text", "unet", "vae", "other"}
        assert all(0 < r["shares"][p] < 1 for p in ("text", "unet", "vae")), r["shares"]
        assert abs(sum(r["shares"].values()) - 1) < 0.05, r["shares"]
        for c in r["calls"]:  # the parts are inside the call: other = e2e - parts >= 0, and each part ran
            assert c["other_s"] >= 0 and min(c["text_s"], c["unet_s"], c["vae_s"]) > 0
    ours = {(r["steps"], r["batch"]): r for r in rec["results"] if r["impl"] == "ours"}
    # more UNet calls per image: the UNet's share grows with the step count
    assert ours[(4, 1)]["shares"]["unet"] > ours[(1, 1)]["shares"]["unet"]


def test_few_step_images_are_generates_images():
    """The bench's batched route is generate's (the turbo recipe at B rows): at B = 1 the same pixels, and each row of
    a batch an image of its own."""
    from dataclasses import replace

    from bench.few_step import PROMPT, few_step_images
    from bench.models import build_bundle

    from gbsd_core.family import SD_TURBO
    from gbsd_core.pipeline import GenerationParams, generate

    bundle = replace(build_bundle("sd21", tiny=True), family=SD_TURBO)
    ours = few_step_images(bundle, 2, 1, 64, seed=3)[0]
    ref = generate(bundle, GenerationParams(PROMPT, steps=2, cfg=0.0, seed=3, sampler="euler_a", spacing="trailing",
                                            width=64, height=64)).image
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    two = few_step_images(bundle, 2, 2, 64, seed=3)
    assert len(two) == 2 and not np.array_equal(np.asarray(two[0]), np.asarray(two[1]))


@pytest.mark.parametrize("argv, needle", [(["--steps", "0"], "positive integers"), (["--size", "60"], "multiple of 8"),
                                          (["--batch", "x"], "comma-separated integers"),
                                          (["--dtype", "fp64"], "invalid choice")])
def test_few_step_bad_flags_exit_2_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["few-step", "--tiny", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
