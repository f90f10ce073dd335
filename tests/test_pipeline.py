"""txt2img / img2img / sweeps on a tiny random SD1 checkpoint: stage identities, diffusers parity, UNet call counts."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _reference import diffusers_sd_pipeline
from _util import max_pixel_diff
from PIL import Image

import gbsd_core
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
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


def test_layout_fraction_one_is_plain_sd_on_the_global_prompt_bit_for_bit(bundle):
    plain = generate(bundle, GenerationParams(PROMPT, steps=6, seed=3, **SIZE))
    gbsd = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=1.0, steps=6, seed=3, **SIZE))
    assert gbsd.layout_steps == 6
    assert np.array_equal(pixels(plain), pixels(gbsd))


def test_layout_fraction_zero_alpha_zero_is_plain_sd_on_the_local_prompt_bit_for_bit(bundle):
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
    n, layout, alphas, focus = 10, 0.8, [0.0, 0.5, 1.0], ["a carrot", "a bunny"]
    results = sweep(bundle, GenerationParams(PROMPT, layout=layout, steps=n, seed=5, **SIZE), alphas=alphas,
                    focus_prompts=focus)
    assert len(results) == 6
    k, n_layout = len(results), layout_steps(n, layout)
    assert results[0].unet_calls == n_layout + k * (n - n_layout) == 20  # instead of k·n = 60
    for r in results:
        single = generate(bundle, GenerationParams(PROMPT, focus=r.params.focus, alpha=r.params.alpha, layout=layout,
                                                   steps=n, seed=5, **SIZE))
        assert single.unet_calls == n
        assert np.abs(pixels(r) - pixels(single)).max() <= 1  # batched vs batch-1 matmuls: ≤ 1/255
    assert [(r.params.focus, r.params.alpha) for r in results] == [(f, a) for f in focus for a in alphas]


def test_sweep_unet_calls_for_k10(bundle):
    n, layout = 10, 0.8
    alphas = [i / 9 for i in range(10)]
    results = sweep(bundle, GenerationParams(PROMPT, focus=FOCUS, layout=layout, steps=n, seed=0, **SIZE), alphas=alphas)
    assert len(results) == 10
    assert results[0].unet_calls == 8 + 10 * 2 == 28  # n_layout + K·(n − n_layout), against K·n = 100


def test_img2img_runs_the_truncated_schedule(bundle):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    r = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=10, strength=0.5, layout=0.8, seed=1), init_image=init)
    assert r.executed_steps == 5 and r.layout_steps == 4 and r.unet_calls == 5
    assert r.image.size == (64, 64)
    # A layout fraction of 1 in img2img equals plain img2img bit for bit, too.
    a = generate(bundle, GenerationParams(PROMPT, steps=10, strength=0.6, seed=1), init_image=init)
    b = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, layout=1.0, steps=10, strength=0.6, seed=1), init_image=init)
    assert np.array_equal(pixels(a), pixels(b))


def test_a_16_bit_init_image_is_its_8_bit_twin(bundle):
    """A 16-bit greyscale init (I;16, each 8-bit level v stored as 257·v) gives the image of the 8-bit grey it
    holds, through generate and through encode_images (convert("RGB") clipped it: 99.6 % white); a floating-point
    init has no white level and is refused before any compute."""
    grey8 = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    i16, rgb8 = Image.fromarray(grey8.astype(np.uint16) * 257), Image.fromarray(grey8).convert("RGB")
    assert i16.mode == "I;16"
    params = GenerationParams(PROMPT, focus=FOCUS, steps=6, strength=0.5, seed=1)
    assert np.array_equal(pixels(generate(bundle, params, init_image=i16)), pixels(generate(bundle, params, init_image=rgb8)))
    assert torch.equal(bundle.encode_images([i16], sample=False), bundle.encode_images([rgb8], sample=False))
    with pytest.raises(ValueError, match="mode F"):
        generate(bundle, params, init_image=Image.new("F", (64, 64), 0.5))


def test_img2img_needs_a_multiple_of_8_or_a_size(bundle):
    init = Image.new("RGB", (60, 64))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        generate(bundle, GenerationParams(PROMPT, steps=4), init_image=init)
    r = generate(bundle, GenerationParams(PROMPT, steps=4, width=64, height=56), init_image=init)
    assert r.image.size == (64, 56)


@pytest.mark.parametrize("size", [(72, 56), (40, 64)])  # latents 9x7 and 5x8: the UNet upsamples to odd skip sizes
def test_sizes_that_are_multiples_of_8_but_not_of_64(bundle, size):
    r = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=3, width=size[0], height=size[1]))
    assert r.image.size == size


NAN, INF = float("nan"), float("inf")
BAD_PARAMS = [
    # (fields, text of the ValueError) -- the Python API's share of the hostile inputs: types (bool is not an int,
    # a whole float is not an int, text is not a list), finiteness, and the ranges of gbsd_core/params.py.
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(alpha=NAN), "alpha"), (dict(alpha="0.5"), "alpha"),
    (dict(alpha=None), "alpha"), (dict(alpha=True), "alpha"), (dict(alpha=[0.5]), "alpha"),
    (dict(layout=2.0), "layout"), (dict(layout=INF), "layout"), (dict(layout=-INF), "layout"),
    (dict(steps=0), "steps"), (dict(steps=True), "steps"), (dict(steps=2.0), "steps"), (dict(steps="3"), "steps"),
    (dict(steps=None), "steps"), (dict(steps=1001), "steps"), (dict(steps=10**6), "steps"),
    (dict(strength=0.0), "strength"), (dict(strength=1.5), "strength"), (dict(strength=NAN), "strength"),
    (dict(cfg=NAN), "cfg"), (dict(cfg=INF), "cfg"), (dict(cfg=-1.0), "cfg"), (dict(cfg=1e9), "cfg"),
    (dict(cfg="7.5"), "cfg"),
    (dict(eta=1.5), "eta"), (dict(eta=100.0), "eta"), (dict(eta=NAN), "eta"), (dict(eta=-0.1), "eta"),
    (dict(seed=1.5), "seed"), (dict(seed=3.0), "seed"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"),
    (dict(seed=False), "seed"), (dict(seed="1"), "seed"),
    (dict(width=65.0), "width"), (dict(width="64"), "width"), (dict(width=True), "width"), (dict(height=0), "height"),
    (dict(height=-8), "height"), (dict(width=10**9), "width"),
    (dict(prompt=None), "prompt"), (dict(prompt=["a", "b"]), "prompt"), (dict(prompt=b"bytes"), "prompt"),
    (dict(prompt="a\ud800b"), "prompt"), (dict(prompt="a\0b"), "prompt"), (dict(prompt="x" * 20000), "prompt"),
    (dict(negative=["ugly", "blurry"]), "negative"), (dict(negative=None), "negative"),
    (dict(focus=""), "focus"), (dict(focus=" \n"), "focus"), (dict(focus=5), "focus"), (dict(focus=["a"]), "focus"),
    (dict(sampler="heun"), "sampler"), (dict(sampler=None), "sampler"), (dict(sampler=["euler"]), "sampler"),
    (dict(schedule="Karras"), "schedule"), (dict(schedule=1), "schedule"),
]


@pytest.mark.parametrize("bad, match", BAD_PARAMS, ids=[f"{k}={v!r:.12}" for b, _ in BAD_PARAMS for k, v in b.items()])
def test_bad_parameters_fail_before_any_compute(bad, match):
    class NoBundle:  # any attribute access would mean compute started
        def __getattr__(self, name):
            raise AssertionError(f"touched bundle.{name} before validating")

    with pytest.raises(ValueError, match=match) as e:
        generate(NoBundle(), GenerationParams(**{"prompt": PROMPT, **bad}))
    print(e.value)


def test_fair_values_are_accepted_and_normalised():
    p = GenerationParams(PROMPT, alpha=1, layout=np.float32(0.5), cfg=7, seed=np.int64(5), steps=np.int32(4),
                         width=np.int64(64), eta=1)
    assert (p.alpha, p.layout, p.cfg, p.seed, p.steps, p.width, p.eta) == (1.0, 0.5, 7.0, 5, 4, 64, 1.0)
    assert all(type(v) is float for v in (p.alpha, p.layout, p.cfg, p.eta))
    assert all(type(v) is int for v in (p.seed, p.steps, p.width))  # plain Python numbers: JSON-able metadata
    assert GenerationParams(PROMPT, seed=2**64 - 1).seed == 2**64 - 1  # the largest seed torch.Generator takes
    with pytest.raises(ValueError, match="alpha"):
        replace(p, alpha=2.0)  # every way of making one checks it


@pytest.mark.parametrize("sampler, schedule", [("ddim", "normal"), ("euler", "karras"), ("dpmpp_2m", "normal")])
def test_the_validator_and_the_schedule_agree(sampler, schedule):
    """What GenerationParams and params.check_schedule (the CLI's pre-load check) accept, the sampler runs; what
    they refuse, it refuses: DDIM's 1000 steps only with strength < 1, at least one step at any strength."""
    from gbsd_core.ddim import DDIMSampler
    from gbsd_core.params import check_schedule
    from gbsd_core.samplers import make_sampler

    run = make_sampler(SD_SCHEDULE, "epsilon", sampler, schedule)
    for n in [*range(1, 1003, 37), 999, 1000, 1001]:
        for strength in (1.0, 0.999, 0.5, 0.001):
            try:
                check_schedule(GenerationParams(PROMPT, steps=n, strength=strength, sampler=sampler,
                                                schedule=schedule), img2img=True)
                accepted = True
            except ValueError:
                accepted = False
            try:
                run.timesteps(n, strength)
                runs = True
            except ValueError:
                runs = False
            assert accepted == runs, (n, strength)


def test_model_limits_come_from_the_bundle(bundle):
    limits = bundle.limits()
    assert (limits.vae_factor, limits.latent_channels, limits.native_size, limits.max_size) == (8, 4, 512, 2048)
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(bundle, GenerationParams(PROMPT, steps=2, width=60, height=64))
    with pytest.raises(ValueError, match="2048"):
        generate(bundle, GenerationParams(PROMPT, steps=2, width=2056, height=64))
    with pytest.raises(ValueError, match="2048"):
        generate(bundle, GenerationParams(PROMPT, steps=2), init_image=Image.new("RGB", (2064, 8)))


@pytest.mark.parametrize("bad, match", [
    (dict(x_T=torch.full((1, 4, 8, 8), float("nan"))), "x_T"),
    (dict(x_T=torch.zeros(1, 4, 8, 8, dtype=torch.long)), "x_T"),
    (dict(x_T=np.zeros((1, 4, 8, 8))), "x_T"),
    (dict(init_image=np.zeros((64, 64, 3), dtype=np.uint8)), "init_image"),
    (dict(init_image="photo.png"), "init_image"),
])
def test_bad_tensors_and_images_are_refused(bundle, bad, match):
    with pytest.raises(ValueError, match=match):
        generate(bundle, GenerationParams(PROMPT, steps=2, **SIZE), **bad)


@pytest.mark.parametrize("bad, match", [
    (dict(alphas=[0.5, "x"]), "alpha"), (dict(alphas=[0.5, NAN]), "alpha"), (dict(alphas="0.5"), "alphas"),
    (dict(focus_prompts=["a", 3]), "focus"), (dict(focus_prompts="a carrot"), "focus_prompts"),
    (dict(focus_prompts=["a", ""]), "focus"), (dict(mixes=0.5), "mixes"), (dict(mixes=[0.0, 2.0]), "focus_mix"),
])
def test_bad_sweeps_are_refused(bundle, bad, match):
    with pytest.raises(ValueError, match=match):
        sweep(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=2, **SIZE), **bad)


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


@pytest.mark.parametrize("alpha, layout", [(0.5, 0.8), (0.2, 0.5)])
def test_gbsd_equals_diffusers_with_embeddings_switched_at_the_boundary(bundle, reference, alpha, layout):
    n = 10
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(22))
    ours = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=alpha, layout=layout, steps=n, **SIZE), x_T=x_T)
    # The reference's own text encoder gives E(global), E(local), E(""); the paper's interpolation is applied here.
    g, neg = reference.encode_prompt(PROMPT, "cpu", 1, True, "")
    loc, _ = reference.encode_prompt(FOCUS, "cpu", 1, True, "")
    focus = alpha * g + (1 - alpha) * loc
    n_layout = layout_steps(n, layout)
    switched = []

    def switch(pipe, i, t, kwargs):
        # Called after step i; what it returns is used from step i + 1 on. With CFG prompt_embeds is [neg; pos].
        if i == n_layout - 1:
            switched.append(i)
            return {"prompt_embeds": torch.cat([neg, focus])}
        return {}

    diff = max_pixel_diff(pixels(ours), _reference_image(reference, PROMPT, n, x_T, switch))
    print(f"GBSD (α={alpha}, layout fraction {layout}) vs diffusers + callback switch: max pixel diff {diff * 255:.3f}/255")
    assert switched == [n_layout - 1]
    assert diff <= 1 / 255
    plain = _reference_image(reference, PROMPT, n, x_T)
    assert np.abs(plain - _reference_image(reference, PROMPT, n, x_T, switch)).max() > 2 / 255  # the switch matters


def test_every_field_has_one_rule():
    """GenerationParams and params.FIELDS name the same fields (a new field needs its rule), and a rule reads back
    what it describes."""
    from dataclasses import fields

    from gbsd_core.params import FIELDS, Field

    assert {f.name for f in fields(GenerationParams)} == set(FIELDS)
    assert FIELDS["steps"].describe() == "an integer in [1, 1000]"
    assert FIELDS["strength"].describe() == "a number in (0, 1]"
    sampler = Field(str, choices=("ddim", "euler"))  # the form a name-valued field takes
    assert sampler.check("sampler", "euler") == "euler"
    with pytest.raises(ValueError, match="sampler must be one of ddim, euler, got 'dpm' "):
        sampler.check("sampler", "dpm")


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
    (dict(focus="a bunny", focus_to=3), "focus_to must be text"),
    (dict(focus="a bunny", focus_to=""), "focus_to must not be blank"),
    (dict(focus="a bunny", focus_to="a carrot", focus_mix=1.5), "focus_mix must be a number in"),
    (dict(focus="a bunny", focus_to="a carrot", focus_mix=float("nan")), "focus_mix must be a finite number in"),
    (dict(focus="a bunny", focus_to="a carrot", focus_mix="0.5"), "focus_mix must be a number in"),
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


def _broken(ckpt, part: str):
    """The tiny model with one output made non-finite: the UNet's (every prediction inf) or the decoder's."""
    b = gbsd_core.load(ckpt)
    with torch.no_grad():
        if part == "unet":
            b.unet.out[2].bias.fill_(float("inf"))
        else:
            b.vae.decoder.conv_out.bias[0] = float("nan")
    return b


@pytest.mark.parametrize("part, needle", [("unet", "the sampler's final latents hold"),
                                          ("vae", "the VAE's decoded images hold")])
def test_a_non_finite_result_is_refused_not_made_into_an_image(tiny_ckpt, part, needle):
    """NaN pixels used to be cast to uint8 0: an all-black image, returned (and written by the CLI) without a word."""
    from gbsd_core.errors import NonFiniteError

    b = _broken(tiny_ckpt, part)
    with pytest.raises(NonFiniteError, match=needle) as e:
        generate(b, GenerationParams(PROMPT, steps=2, **SIZE))
    print(e.value)
    with pytest.raises(NonFiniteError, match=needle):
        sweep(b, GenerationParams(PROMPT, focus=FOCUS, steps=2, **SIZE), alphas=[0.0, 1.0])
