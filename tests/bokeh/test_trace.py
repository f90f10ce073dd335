"""The x̂0 filmstrip (gbsd_core/bokeh/trace.py): which steps are kept, captions, the stage marker, one decode per
kept frame, the linear preview against the published factors, and -- above all -- a traced run's image is the
untraced run's image bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gbsd_core
from gbsd_core.bokeh.pictures import MARK, MARK_WIDTH, PAD, save_animation
from gbsd_core.bokeh.trace import Tracer, latent_rgb_preview, trace_steps
from gbsd_core.pipeline import GenerationParams, generate
from gbsd_core.sampling import CFGStep, Stage, StepState, denoise, focus_conditioning
from _util import model_ddim

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)
# CompVis DDIM timesteps for 10 steps: range(0, 1000, 100) + 1, descending (written out, not computed by us).
T10 = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.fixture(scope="module", params=["tiny_ckpt", "responsive_ckpt"])
def bundle(request):
    return gbsd_core.load(request.getfixturevalue(request.param))


@pytest.fixture(scope="module")
def responsive(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)


@pytest.mark.parametrize("n, starts, every, expected", [
    (10, [8], 2, [0, 2, 4, 6, 8, 9]),
    (10, [7], 3, [0, 3, 6, 7, 9]),  # the first focus step (7) and the last (9) are always kept
    (5, [4], None, [0, 1, 2, 3, 4]),  # few steps: every one
    (1, [], None, [0]),
    (50, [40], None, [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 49]),  # k = 3 would keep 18 > 16
    (50, [], 100, [0, 49]),
])
def test_kept_steps(n, starts, every, expected):
    assert trace_steps(n, starts, every) == expected


def test_automatic_k_keeps_at_most_16_frames_the_boundary_and_the_last_step():
    for n in range(1, 301):
        for starts in ([], [round(0.8 * n)], [n // 3, 2 * n // 3]):
            kept = trace_steps(n, starts)
            assert len(kept) <= 16, (n, starts)
            assert kept[0] == 0 and kept[-1] == n - 1
            assert all(s in kept for s in starts if 0 < s < n)
            assert kept == sorted(set(kept))
    assert len(trace_steps(20, list(range(1, 20)), max_frames=4)) == 20  # more stage starts than frames: all kept


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_every_is_refused(bad):
    with pytest.raises(ValueError, match="every"):
        trace_steps(10, [], bad)
    with pytest.raises(ValueError, match="every"):
        Tracer(lambda x: [], every=bad)


@pytest.mark.parametrize("eta", [0.0, 0.7])  # η > 0: the trace must not draw from the run's generator either
def test_trace_leaves_the_image_bit_identical(bundle, eta):
    params = GenerationParams(PROMPT, focus=FOCUS, steps=6, layout=0.5, seed=4, eta=eta, **SIZE)
    plain = np.asarray(generate(bundle, params).image)
    for decode in (bundle.decode_latents, latent_rgb_preview):
        tracer = Tracer(decode, every=1)
        traced = np.asarray(generate(bundle, params, watch=tracer).image)
        assert len(tracer.frames) == 6
        assert traced.tobytes() == plain.tobytes()


def test_one_vae_decode_per_kept_frame(responsive, monkeypatch):
    calls = []
    real = responsive.vae.decode
    monkeypatch.setattr(responsive.vae, "decode", lambda z: calls.append(z.shape[0]) or real(z))
    tracer = Tracer(responsive.decode_latents, every=3)
    generate(responsive, GenerationParams(PROMPT, focus=FOCUS, steps=10, layout=0.7, **SIZE), watch=tracer)
    assert tracer.steps == [0, 3, 6, 7, 9]
    assert calls == [1] * 5 + [1]  # one decode of one row per kept frame, then the final image
    calls.clear()
    generate(responsive, GenerationParams(PROMPT, focus=FOCUS, steps=10, layout=0.7, **SIZE),
             watch=Tracer(latent_rgb_preview, every=3))
    assert calls == [1]  # the linear preview needs no VAE


def test_frames_and_captions_follow_the_settings(responsive):
    n, layout = 10, 0.7  # layout steps 0..6, focus 7..9
    tracer = Tracer(responsive.decode_latents, every=3)
    params = GenerationParams(PROMPT, focus=FOCUS, steps=n, layout=layout, seed=2, **SIZE)
    generate(responsive, params, watch=tracer)
    assert [f.step for f in tracer.frames] == [0, 3, 6, 7, 9]
    assert tracer.captions() == [
        f"step 1/10\nt {T10[0]}\nlayout", f"step 4/10\nt {T10[3]}\nlayout", f"step 7/10\nt {T10[6]}\nlayout",
        f"step 8/10\nt {T10[7]}\nfocus starts", "step 10/10\nt 1\nfocus"]
    # Each frame is the decoded x̂0 of its step: re-run the loop by hand (sampling.denoise, the README's recipe).
    g, loc, neg = (responsive.encode_prompt(p) for p in (PROMPT, FOCUS, ""))
    stages = [Stage("layout", range(0, 7), g), Stage("focus", range(7, 10), focus_conditioning(g, loc, 0.5))]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ddim = model_ddim(responsive)
    with torch.inference_mode():
        x0 = {s.step: s.pred_x0 for s in denoise(CFGStep(responsive.unet, ddim, 7.5), x, ddim.timesteps(n), stages,
                                                    neg)}
    for frame in tracer.frames:
        ref = np.asarray(responsive.decode_latents(x0[frame.step])[0], dtype=np.int16)
        assert np.abs(np.asarray(frame.image, dtype=np.int16) - ref).max() <= 1
    assert not np.array_equal(np.asarray(tracer.frames[0].image), np.asarray(tracer.frames[-1].image))


def test_sigma_is_captioned_when_the_state_carries_one():
    # A σ-based sampler's states carry their noise level; the tracer shows it without knowing the sampler.
    img = Image.new("RGB", (16, 16))
    lat = torch.zeros(1, 4, 2, 2)
    states = [StepState(0, 999, "layout", lat, lat, sigma=14.6146), StepState(1, 500, "focus", lat, lat, sigma=0.9),
              StepState(2, 1, "focus", lat, lat)]
    stages = [Stage("layout", range(0, 1), lat), Stage("focus", range(1, 3), lat)]
    tracer = Tracer(lambda x: [img], every=1)
    passed = list(tracer.watch(iter(states), torch.tensor([999, 500, 1]), stages))
    assert all(a is b for a, b in zip(passed, states, strict=True))  # the very same states, in order
    assert tracer.captions() == ["step 1/3\nt 999  sigma 14.6\nlayout", "step 2/3\nt 500  sigma 0.9\nfocus starts",
                                 "step 3/3\nt 1\nfocus"]


def test_the_first_focus_frame_is_marked(responsive):
    tracer = Tracer(responsive.decode_latents, every=3)
    generate(responsive, GenerationParams(PROMPT, focus=FOCUS, steps=10, layout=0.7, **SIZE), watch=tracer)
    cells = tracer.cells()
    assert len({c.size for c in cells}) == 1  # one cell size: sheet and animation do not jump
    for i, cell in enumerate(cells):
        bar = np.asarray(cell)[:, :MARK_WIDTH]
        is_mark = np.all(bar == np.array(MARK, dtype=np.uint8), axis=-1)
        assert is_mark.all() if i == 3 else not is_mark.any(), i  # frame 3 = step 8, the first focus step
    # The sheet: 5 cells in one row (at most 8 per row), PAD apart.
    w, h = cells[0].size
    assert tracer.sheet().size == (PAD + 5 * (w + PAD), PAD + h + PAD)
    assert tracer.sheet(columns=2).size == (PAD + 2 * (w + PAD), PAD + 3 * (h + PAD))


def test_animation_has_one_frame_per_kept_step(responsive, tmp_path):
    tracer = Tracer(responsive.decode_latents, every=2)
    generate(responsive, GenerationParams(PROMPT, focus=FOCUS, steps=6, **SIZE), watch=tracer)
    for name in ("t.webp", "t.gif"):
        save_animation(tracer.cells(), tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.n_frames == len(tracer.steps) == 4 and im.size == tracer.cells()[0].size
    with pytest.raises(ValueError, match="webp"):
        save_animation(tracer.cells(), tmp_path / "t.png")


def test_linear_preview_uses_the_published_sd_factors():
    # ComfyUI's latent_formats.SD15 factors (typed in from the published table): rows = latent channels, cols = RGB.
    factors = np.array([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                        [-0.2120, -0.2616, -0.7177]])
    values = np.array([[0.5, -1.0, 0.25, 0.0], [-0.3, 0.8, 1.2, -0.6], [3.0, 3.0, 0.0, -2.0]])  # the last clamps
    lat = torch.tensor(values.T, dtype=torch.float32).reshape(1, 4, 1, 3)  # [B, C, h, w]
    (img,) = latent_rgb_preview(lat)
    assert img.size == (24, 8)  # 8x the latent: the image's size
    arr = np.asarray(img).astype(np.float64)
    for i, v in enumerate(values):
        expected = np.clip(np.rint((v @ factors + 1) / 2 * 255), 0, 255)  # [-1, 1] -> [0, 255], clamped
        block = arr[:, 8 * i:8 * i + 8].reshape(-1, 3)
        assert np.abs(block - expected).max() <= 1, (i, block[0], expected)  # one colour per 8x8 block
    with pytest.raises(ValueError, match="latents"):
        latent_rgb_preview(torch.zeros(1, 3, 2, 2))
