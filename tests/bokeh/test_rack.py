"""Rack focus (gbsd_core/bokeh/rack.py) on the tiny model that listens to its context: every frame equals its
independent GBSD run, the layout stage is shared (UNet rows counted by a hook of the test's own), the end frames
are plain GBSD on each object, and the per-object masks come from the pure end frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gbsd_core
from gbsd_core.bokeh.attnmaps import CrossAttentionCollector, word_positions
from gbsd_core.bokeh.metrics import SharpnessReport, to_gray
from gbsd_core.bokeh.rack import check_rack, rack_focus, rack_mixes
from gbsd_core.pipeline import GenerationParams, generate
from gbsd_core.sampling import CFGStep, Stage, denoise
from _util import model_ddim

PROMPT, FROM, TO = "a bunny and a carrot in a garden, bokeh", "a bunny", "a carrot"
SIZE = dict(width=64, height=64)
N, SIGMA, K = 8, 0.5, 4  # 4 shared layout steps, 4 focus steps per frame


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)


@pytest.fixture(scope="module")
def params():
    return GenerationParams(PROMPT, focus=FROM, focus_to=TO, steps=N, layout=SIGMA, seed=3, **SIZE)


@pytest.fixture(scope="module")
def counted_rack(bundle, params):
    """The rack, and the UNet rows it evaluated, counted from the UNet's own inputs (CFG doubles each row)."""
    rows = []
    handle = bundle.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0] // 2))
    try:
        rack = rack_focus(bundle, params, K)
    finally:
        handle.remove()
    return rack, rows


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_mixes():
    assert rack_mixes(2) == [0.0, 1.0]
    assert rack_mixes(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_the_layout_stage_is_shared(counted_rack):
    rack, rows = counted_rack
    n_layout = 4  # round(0.5 · 8)
    assert rows == [1] * n_layout + [K] * (N - n_layout)  # batch 1 for the layout, then all K frames at once
    assert sum(rows) == rack.unet_calls == n_layout + K * (N - n_layout) == 20  # instead of K·N = 32


def test_every_frame_equals_its_independent_run(bundle, counted_rack):
    rack, _ = counted_rack
    assert [f.mix for f in rack.frames] == [0.0, 1 / 3, 2 / 3, 1.0]
    for frame in rack.frames:
        p = frame.result.params
        assert (p.focus, p.focus_to, p.focus_mix) == (FROM, TO, frame.mix)
        single = generate(bundle, p)
        assert single.unet_calls == N
        assert np.abs(px(single.image) - px(frame.result.image)).max() <= 1  # batched vs batch-1 matmuls: ≤ 1/255
    # The end frames are plain GBSD on each object; the mix matters in between.
    for frame, obj in ((rack.frames[0], FROM), (rack.frames[-1], TO)):
        plain = generate(bundle, GenerationParams(PROMPT, focus=obj, steps=N, layout=SIGMA, seed=3, **SIZE))
        assert np.abs(px(plain.image) - px(frame.result.image)).max() <= 1
    assert np.abs(px(rack.frames[0].result.image) - px(rack.frames[-1].result.image)).max() > 8


def test_a_middle_frame_is_the_blended_embedding_run_by_hand(bundle, counted_rack):
    """Independent of the pipeline: E(·) from the text encoder, the blend and the GBSD mix written out here, the
    plain denoise loop, the VAE."""
    rack, _ = counted_rack
    m, alpha = 1 / 3, 0.5
    g, a, b, neg = (bundle.encode_prompt(p) for p in (PROMPT, FROM, TO, ""))
    local = (1 - m) * a + m * b
    stages = [Stage("layout", range(0, 4), g), Stage("focus", range(4, N), alpha * g + (1 - alpha) * local)]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for state in denoise(CFGStep(bundle.unet, (ddim := model_ddim(bundle)), 7.5), x, ddim.timesteps(N),
                             stages, neg):
            pass
    ref = bundle.decode_latents(state.latents)[0]
    assert np.abs(px(ref) - px(rack.frames[1].result.image)).max() <= 1


def test_masks_come_from_the_pure_end_frames_and_every_frame_is_measured_on_them(bundle, counted_rack):
    rack, _ = counted_rack
    assert set(rack.masks) == {FROM, TO}
    # The mask of each object as `gbsd eval` would get it: an independent plain GBSD run on that object alone.
    for obj in (FROM, TO):
        collector = CrossAttentionCollector(bundle.unet, word_positions(bundle.tokenizer(obj)))
        generate(bundle, GenerationParams(PROMPT, focus=obj, steps=N, layout=SIGMA, seed=3, **SIZE), probe=collector)
        alone = collector.mask(0, (64, 64))
        agreement = (alone == rack.masks[obj]).mean()
        print(f"{obj}: mask covers {rack.masks[obj].mean():.3f}, agreement with its own run {agreement:.4f}")
        assert agreement > 0.99
    for frame in rack.frames:
        assert set(frame.sharpness) == {FROM, TO}
        for obj, report in frame.sharpness.items():
            again = SharpnessReport.measure(to_gray(frame.result.image), rack.masks[obj])
            assert report == again
    captions = rack.captions()
    assert captions[0].split("\n")[0] == "frame 1/4  m 0.00" and captions[2].split("\n")[0] == "frame 3/4  m 0.67"
    rep = rack.frames[1].sharpness[TO]
    vol = f"T {rep.target.laplacian_var:.1f} / B {rep.background.laplacian_var:.1f}"
    assert captions[1].split("\n")[2] == f"a carrot: {vol}"
    sheet = rack.sheet()
    assert sheet.width > 4 * 64 and sheet.height > 64


def test_without_masks(bundle, params):
    rack = rack_focus(bundle, params, 2, masks=False)
    assert rack.masks == {} and all(f.sharpness == {} for f in rack.frames)
    assert rack.captions()[1] == "frame 2/2  m 1.00\nno masks"


@pytest.mark.parametrize("change, frames, match", [
    ({}, 1, "frames"),
    ({}, 65, "frames"),
    ({}, True, "frames"),
    (dict(focus_to="A  Bunny"), 4, "same prompt"),  # the tokenizer lower-cases and collapses spaces
    (dict(focus_to="  "), 4, "blank"),  # refused by GenerationParams itself (params.FIELDS)
    (dict(focus_to=None), 4, "focus_to"),
    (dict(layout=1.0), 4, "no focus stage"),
    (dict(alpha=1.0), 4, "alpha 1"),
    (dict(steps=0), 4, "steps"),
])
def test_bad_requests_fail_before_any_compute(params, change, frames, match):
    from dataclasses import replace

    with pytest.raises(ValueError, match=match):
        check_rack(replace(params, **change), frames)

    class NoBundle:  # any attribute access would mean compute started
        def __getattr__(self, name):
            raise AssertionError(f"touched bundle.{name} before validating")

    with pytest.raises(ValueError, match=match):
        rack_focus(NoBundle(), replace(params, **change), frames)
