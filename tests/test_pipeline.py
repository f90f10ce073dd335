"""txt2img / img2img / sweeps on a tiny random SD1 checkpoint: stage identities, diffusers parity, UNet call counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import diffusers_sd_pipeline
from _util import max_pixel_diff
from PIL import Image

import gbsd_core
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.sampling import layout_steps

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    # The stage tests must be able to fail, so the model must respond to its conditioning (see conftest.py). The
    # diffusers twin below is built from these same weights.
    return gbsd_core.load(responsive_ckpt)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_sigma_one_is_plain_sd_on_the_global_prompt_bit_for_bit(bundle):
    plain = generate(bundle, GenerationParams(PROMPT, steps=6, seed=3, **SIZE))
    gbsd = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=1.0, steps=6, seed=3, **SIZE))
    assert gbsd.layout_steps == 6
    assert np.array_equal(pixels(plain), pixels(gbsd))


def test_sigma_zero_alpha_zero_is_plain_sd_on_the_local_prompt_bit_for_bit(bundle):
    plain = generate(bundle, GenerationParams(FOCUS, steps=6, seed=3, **SIZE))
    gbsd = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=0.0, layout=0.0, steps=6, seed=3, **SIZE))
    global_only = generate(bundle, GenerationParams(PROMPT, steps=6, seed=3, **SIZE))
    assert gbsd.layout_steps == 0
    assert np.array_equal(pixels(plain), pixels(gbsd))
    assert not np.array_equal(pixels(plain), pixels(global_only))  # the prompts do make different images


def test_same_seed_same_image_other_seed_other_image(bundle):
    p = GenerationParams(PROMPT, focus=FOCUS, steps=4, seed=11, **SIZE)
    a, b = generate(bundle, p), generate(bundle, p)
    c = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=4, seed=12, **SIZE))
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_sweep_equals_independent_runs_and_shares_the_layout_stage(bundle):
    n, sigma, alphas, focus = 10, 0.8, [0.0, 0.5, 1.0], ["a carrot", "a bunny"]
    results = sweep(bundle, GenerationParams(PROMPT, layout=sigma, steps=n, seed=5, **SIZE), alphas=alphas,
                    focus_prompts=focus)
    assert len(results) == 6
    k, n_layout = len(results), layout_steps(n, sigma)
    assert results[0].unet_calls == n_layout + k * (n - n_layout) == 20  # instead of k·n = 60
    for r in results:
        single = generate(bundle, GenerationParams(PROMPT, focus=r.params.focus, alpha=r.params.alpha, layout=sigma,
                                                   steps=n, seed=5, **SIZE))
        assert single.unet_calls == n
        assert np.abs(pixels(r) - pixels(single)).max() <= 1  # batched vs batch-1 matmuls: ≤ 1/255
    assert [(r.params.focus, r.params.alpha) for r in results] == [(f, a) for f in focus for a in alphas]


def test_sweep_unet_calls_for_k10(bundle):
    n, sigma = 10, 0.8
    alphas = [i / 9 for i in range(10)]
    results = sweep(bundle, GenerationParams(PROMPT, focus=FOCUS, layout=sigma, steps=n, seed=0, **SIZE), alphas=alphas)
    assert len(results) == 10
    assert results[0].unet_calls == 8 + 10 * 2 == 28  # n_layout + K·(n − n_layout), against K·n = 100


def test_img2img_runs_the_truncated_schedule(bundle):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    r = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=10, strength=0.5, layout=0.8, seed=1), init_image=init)
    assert r.executed_steps == 5 and r.layout_steps == 4 and r.unet_calls == 5
    assert r.image.size == (64, 64)
    # σ = 1 img2img equals plain img2img bit for bit, too.
    a = generate(bundle, GenerationParams(PROMPT, steps=10, strength=0.6, seed=1), init_image=init)
    b = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, layout=1.0, steps=10, strength=0.6, seed=1), init_image=init)
    assert np.array_equal(pixels(a), pixels(b))


def test_img2img_needs_a_multiple_of_8_or_a_size(bundle):
    init = Image.new("RGB", (60, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(bundle, GenerationParams(PROMPT, steps=4), init_image=init)
    r = generate(bundle, GenerationParams(PROMPT, steps=4, width=64, height=56), init_image=init)
    assert r.image.size == (64, 56)


@pytest.mark.parametrize("size", [(72, 56), (40, 64)])  # latents 9x7 and 5x8: the UNet upsamples to odd skip sizes
def test_sizes_that_are_multiples_of_8_but_not_of_64(bundle, size):
    r = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=3, width=size[0], height=size[1]))
    assert r.image.size == size


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(layout=2.0), "layout"),
        (dict(steps=0), "steps"),
        (dict(strength=0.0), "strength"),
        (dict(strength=1.5), "strength"),
        (dict(width=65), "width"),
        (dict(height=0), "height"),
    ],
)
def test_bad_parameters_fail_before_any_compute(bad, match):
    class NoBundle:  # any attribute access would mean compute started
        def __getattr__(self, name):
            raise AssertionError(f"touched bundle.{name} before validating")

    with pytest.raises(ValueError, match=match):
        generate(NoBundle(), GenerationParams(PROMPT, **bad))


def test_x_T_is_injectable_and_checked(bundle):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    a = generate(bundle, GenerationParams(PROMPT, steps=3, seed=0, **SIZE), x_T=x_T)
    b = generate(bundle, GenerationParams(PROMPT, steps=3, seed=1, **SIZE), x_T=x_T)
    assert np.array_equal(pixels(a), pixels(b))  # with eta = 0 the seed only draws x_T
    with pytest.raises(ValueError, match="x_T has shape"):
        generate(bundle, GenerationParams(PROMPT, steps=3, **SIZE), x_T=torch.randn(1, 4, 4, 4))


# ------------------------------------------------------------------------------------------ parity with diffusers


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory):
    pipe = diffusers_sd_pipeline(bundle, tmp_path_factory.mktemp("sd-pipe"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_image(pipe, prompt, n, x_T, callback=None) -> np.ndarray:
    out = pipe(prompt, negative_prompt="", num_inference_steps=n, guidance_scale=7.5, eta=0.0, latents=x_T.clone(),
               output_type="np", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["prompt_embeds"], **SIZE)
    return out.images[0]


def test_plain_txt2img_equals_diffusers(bundle, reference):
    n = 8
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    ours = generate(bundle, GenerationParams(PROMPT, steps=n, cfg=7.5, **SIZE), x_T=x_T)
    diff = max_pixel_diff(pixels(ours), _reference_image(reference, PROMPT, n, x_T))
    print(f"plain txt2img vs diffusers StableDiffusionPipeline: max pixel diff {diff * 255:.3f}/255")
    assert diff <= 1 / 255


@pytest.mark.parametrize("alpha, sigma", [(0.5, 0.8), (0.2, 0.5)])
def test_gbsd_equals_diffusers_with_embeddings_switched_at_the_boundary(bundle, reference, alpha, sigma):
    n = 10
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(22))
    ours = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=alpha, layout=sigma, steps=n, **SIZE), x_T=x_T)
    # The reference's own text encoder gives E(global), E(local), E(""); the paper's interpolation is applied here.
    g, neg = reference.encode_prompt(PROMPT, "cpu", 1, True, "")
    loc, _ = reference.encode_prompt(FOCUS, "cpu", 1, True, "")
    focus = alpha * g + (1 - alpha) * loc
    n_layout = layout_steps(n, sigma)
    switched = []

    def switch(pipe, i, t, kwargs):
        # Called after step i; what it returns is used from step i + 1 on. With CFG prompt_embeds is [neg; pos].
        if i == n_layout - 1:
            switched.append(i)
            return {"prompt_embeds": torch.cat([neg, focus])}
        return {}

    diff = max_pixel_diff(pixels(ours), _reference_image(reference, PROMPT, n, x_T, switch))
    print(f"GBSD (α={alpha}, σ={sigma}) vs diffusers + callback switch: max pixel diff {diff * 255:.3f}/255")
    assert switched == [n_layout - 1]
    assert diff <= 1 / 255
    plain = _reference_image(reference, PROMPT, n, x_T)
    assert np.abs(plain - _reference_image(reference, PROMPT, n, x_T, switch)).max() > 2 / 255  # the switch matters


# ------------------------------------------------------------------------------ focus_to / focus_mix (rack focus)


def test_focus_mix_moves_the_local_embedding_between_two_prompts(bundle):
    base = dict(steps=6, layout=0.5, seed=3, **SIZE)
    plain_from = pixels(generate(bundle, GenerationParams(PROMPT, focus="a bunny", **base)))
    plain_to = pixels(generate(bundle, GenerationParams(PROMPT, focus=FOCUS, **base)))
    mixed = {m: pixels(generate(bundle, GenerationParams(PROMPT, focus="a bunny", focus_to=FOCUS, focus_mix=m, **base)))
             for m in (0.0, 0.5, 1.0)}
    assert np.array_equal(mixed[0.0], plain_from)  # m = 0 is E(focus) exactly
    assert np.array_equal(mixed[1.0], plain_to)  # m = 1 is E(focus_to) exactly
    assert not np.array_equal(mixed[0.5], plain_from) and not np.array_equal(mixed[0.5], plain_to)


def test_sweep_over_mixes_shares_the_layout_and_equals_independent_runs(bundle):
    params = GenerationParams(PROMPT, focus="a bunny", focus_to=FOCUS, layout=0.5, steps=6, seed=5, **SIZE)
    results = sweep(bundle, params, alphas=[0.25, 0.75], mixes=[0.0, 0.5, 1.0])
    assert [(r.params.alpha, r.params.focus_mix) for r in results] == [
        (0.25, 0.0), (0.25, 0.5), (0.25, 1.0), (0.75, 0.0), (0.75, 0.5), (0.75, 1.0)]  # focus, then α, then mix
    assert results[0].unet_calls == 3 + 6 * 3  # n_layout + K·n_focus
    for r in results:
        assert np.abs(pixels(r) - pixels(generate(bundle, r.params))).max() <= 1


@pytest.mark.parametrize("bad, match", [
    (dict(focus_to="a carrot"), "focus_to needs a focus"),
    (dict(focus="a bunny", focus_to=3), "focus_to must be a string"),
    (dict(focus="a bunny", focus_to="a carrot", focus_mix=1.5), "focus_mix must be in"),
    (dict(focus="a bunny", focus_to="a carrot", focus_mix=float("nan")), "focus_mix must be in"),
    (dict(focus="a bunny", focus_mix=0.5), "needs focus_to"),
])
def test_bad_focus_to_and_mix_fail_before_any_compute(bad, match):
    class NoBundle:  # any attribute access would mean compute started
        def __getattr__(self, name):
            raise AssertionError(f"touched bundle.{name} before validating")

    with pytest.raises(ValueError, match=match):
        generate(NoBundle(), GenerationParams(PROMPT, **bad))
    if "focus" in bad:  # (a sweep without a focus prompt stops earlier, on that)
        with pytest.raises(ValueError, match=match):
            sweep(NoBundle(), GenerationParams(PROMPT, **bad), alphas=[0.5])
