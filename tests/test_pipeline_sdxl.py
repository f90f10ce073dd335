"""GBSD on SDXL (tiny random base and refiner checkpoints): stage identities, sweeps, img2img, and parity with
diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline run with DDIM at the CompVis settings on the
same weights, GBSD done there by switching both `prompt_embeds` and `add_text_embeds` in `callback_on_step_end`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import diffusers_sdxl_pipeline
from _samplers import COMBOS, diffusers_scheduler, inject_ancestral_noise
from _sdxl import write_tiny_sdxl
from _util import max_pixel_diff
from PIL import Image

import gbsd_core
from gbsd_core.family import SDXL_BASE, SDXL_REFINER
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.sampling import layout_steps

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return gbsd_core.load(write_tiny_sdxl(tmp_path_factory.mktemp("sdxl-base")))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return gbsd_core.load(write_tiny_sdxl(tmp_path_factory.mktemp("sdxl-refiner"), refiner=True, seed=1))


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_families_and_conditioning_shapes(bundle, refiner):
    assert bundle.family is SDXL_BASE and refiner.family is SDXL_REFINER
    assert bundle.family.resolution == 1024 and bundle.vae.config.scale_factor == 0.13025
    c = bundle.conditioning(PROMPT, (64, 64))
    assert (c.context.shape, c.pooled.shape, c.micro.shape, c.vector.shape) == (
        (1, 77, 192), (1, 32), (1, 6 * 256), (1, bundle.unet.config.adm_in_channels))
    r = refiner.conditioning(PROMPT, (64, 64))
    assert (r.context.shape, r.vector.shape) == ((1, 77, 128), (1, refiner.unet.config.adm_in_channels))
    # the base's empty negative prompt is zeros, the refiner's is E("") (sgm treats the refiner as "legacy")
    neg = bundle.conditioning("", (64, 64), negative=True)
    assert not neg.context.any() and not neg.pooled.any() and torch.equal(neg.micro, c.micro)
    assert bundle.conditioning("", (64, 64)).context.any()  # only the negative prompt is zeroed
    assert refiner.conditioning("", (64, 64), negative=True).context.any()


def test_layout_fraction_one_is_plain_sdxl_on_the_global_prompt_bit_for_bit(bundle):
    plain = generate(bundle, GenerationParams(PROMPT, steps=4, seed=3, **SIZE))
    gbsd = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=1.0, steps=4, seed=3, **SIZE))
    assert np.array_equal(pixels(plain), pixels(gbsd))


def test_layout_fraction_zero_alpha_zero_is_plain_sdxl_on_the_local_prompt_bit_for_bit(bundle):
    plain = generate(bundle, GenerationParams(FOCUS, steps=4, seed=3, **SIZE))
    gbsd = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=0.0, layout=0.0, steps=4, seed=3, **SIZE))
    global_only = generate(bundle, GenerationParams(PROMPT, steps=4, seed=3, **SIZE))
    assert np.array_equal(pixels(plain), pixels(gbsd))
    assert not np.array_equal(pixels(plain), pixels(global_only))


def test_sweep_equals_independent_runs_and_shares_the_layout_stage(bundle):
    n, layout, alphas, focus = 6, 0.5, [0.0, 1.0], ["a carrot", "a bunny"]
    results = sweep(bundle, GenerationParams(PROMPT, layout=layout, steps=n, seed=5, **SIZE), alphas=alphas,
                    focus_prompts=focus)
    n_layout = layout_steps(n, layout)
    assert results[0].unet_calls == n_layout + len(results) * (n - n_layout) == 15
    for r in results:
        single = generate(bundle, GenerationParams(PROMPT, focus=r.params.focus, alpha=r.params.alpha, layout=layout,
                                                   steps=n, seed=5, **SIZE))
        assert np.abs(pixels(r) - pixels(single)).max() <= 1  # batched vs batch-1 matmuls: ≤ 1/255
    assert not np.array_equal(pixels(results[0]), pixels(results[2]))  # the focus prompt matters


def test_img2img_runs_the_truncated_schedule(bundle, refiner):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for b in (bundle, refiner):
        r = generate(b, GenerationParams(PROMPT, focus=FOCUS, steps=8, strength=0.5, layout=0.5, seed=1),
                     init_image=init)
        assert r.executed_steps == 4 and r.layout_steps == 2 and r.image.size == (64, 64)


# ------------------------------------------------------------------------------------------ parity with diffusers
@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory):
    pipe = diffusers_sdxl_pipeline(bundle, tmp_path_factory.mktemp("sdxl-pipe"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_image(pipe, prompt, n, latents, callback=None, **kwargs) -> np.ndarray:
    # negative_prompt=None: with force_zeros_for_empty_prompt diffusers then uses zeros, what our "" gives
    out = pipe(prompt, negative_prompt=None, num_inference_steps=n, guidance_scale=7.5, eta=0.0,
               latents=latents.clone(), output_type="np", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"], **SIZE, **kwargs)
    return out.images[0]


def test_plain_txt2img_equals_diffusers(bundle, reference):
    n = 6
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    ours = generate(bundle, GenerationParams(PROMPT, steps=n, cfg=7.5, **SIZE), x_T=x_T)
    diff = max_pixel_diff(pixels(ours), _reference_image(reference, PROMPT, n, x_T))
    print(f"SDXL plain txt2img vs diffusers StableDiffusionXLPipeline: max pixel diff {diff * 255:.3f}/255")
    assert diff <= 1 / 255


def _switch(reference, alpha: float, n_layout: int, pooled: bool = True):
    """A callback that, after step n_layout - 1, switches diffusers to the focus conditioning: the context and (unless
    `pooled` is False) the pooled embedding, mixed α·E(global) + (1−α)·E(local) from the reference's own encoders.
    With CFG both tensors are [negative; positive]; the size ids (add_time_ids) are left alone."""
    g, neg, g_pooled, neg_pooled = reference.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    loc, _, loc_pooled, _ = reference.encode_prompt(FOCUS, device="cpu", do_classifier_free_guidance=True)
    assert not neg.any() and not neg_pooled.any()  # the zeroed empty negative prompt
    focus = alpha * g + (1 - alpha) * loc
    focus_pooled = alpha * g_pooled + (1 - alpha) * loc_pooled if pooled else g_pooled
    switched = []

    def switch(pipe, i, t, kwargs):
        if i == n_layout - 1:
            switched.append(i)
            return {"prompt_embeds": torch.cat([neg, focus]), "add_text_embeds": torch.cat([neg_pooled, focus_pooled])}
        return {}

    return switch, switched


# σ = 0.7 (the paper's lower bound) rather than 0.8: with 10 steps the tiny model's last two steps move pixels by
# only ~2/255, too little for "the switch matters" to be a sharp check.
@pytest.mark.parametrize("alpha, layout", [(0.5, 0.7), (0.2, 0.5)])
def test_gbsd_equals_diffusers_with_both_embeddings_switched(bundle, reference, alpha, layout):
    n = 10
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(22))
    ours = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=alpha, layout=layout, steps=n, **SIZE), x_T=x_T)
    n_layout = layout_steps(n, layout)
    switch, switched = _switch(reference, alpha, n_layout)
    ref = _reference_image(reference, PROMPT, n, x_T, switch)
    diff = max_pixel_diff(pixels(ours), ref)
    print(f"SDXL GBSD (α={alpha}, layout fraction {layout}) vs diffusers + callback switch: max pixel diff {diff * 255:.3f}/255")
    assert switched == [n_layout - 1]
    assert diff <= 1 / 255
    plain = _reference_image(reference, PROMPT, n, x_T)
    assert np.abs(plain - ref).max() > 2 / 255  # the switch changes the image
    # and the pooled half of the switch matters on its own: switching the context alone is another image
    context_only, _ = _switch(reference, alpha, n_layout, pooled=False)
    assert np.abs(_reference_image(reference, PROMPT, n, x_T, context_only) - ref).max() > 2 / 255


@pytest.mark.parametrize("name, schedule", COMBOS)
def test_every_sampler_runs_gbsd_on_sdxl_as_diffusers_does(bundle, reference, name, schedule, monkeypatch):
    """Euler (SDXL's own default), Euler a and DPM++ 2M, normal and Karras σ: GBSD on the tiny SDXL base equals
    StableDiffusionXLPipeline with the matching diffusers scheduler (tests/_samplers.py) and both embeddings switched
    at the same executed step, within 1/255; Euler a's noise is the z our run draws (injected into diffusers)."""
    n, alpha, layout, seed = 10, 0.5, 0.7, 4
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(23))
    params = GenerationParams(PROMPT, focus=FOCUS, alpha=alpha, layout=layout, steps=n, seed=seed, sampler=name,
                              schedule=schedule, **SIZE)
    ours = generate(bundle, params, x_T=x_T)
    given = inject_ancestral_noise(monkeypatch)
    if name == "euler_a":
        g = torch.Generator().manual_seed(seed)
        given.extend(torch.randn(1, 4, 8, 8, generator=g) for _ in range(n))
    n_layout = layout_steps(n, layout)
    switch, switched = _switch(reference, alpha, n_layout)
    ddim, reference.scheduler = reference.scheduler, diffusers_scheduler(name, schedule)
    try:
        ref = _reference_image(reference, PROMPT, n, x_T, switch)
    finally:
        reference.scheduler = ddim
    diff = max_pixel_diff(pixels(ours), ref)
    print(f"SDXL GBSD {name} {schedule} vs diffusers: max pixel diff {diff * 255:.3f}/255, focus stage from "
          f"σ = {ours.boundary_sigma:.3f}")
    assert switched == [n_layout - 1] and not given  # diffusers switched where we did, and took all of our noise
    assert diff <= 1 / 255
    ddim_image = pixels(generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=alpha, layout=layout, steps=n,
                                                          seed=seed, **SIZE), x_T=x_T))
    # DDIM (η = 0) is Euler's method on x/√ᾱ_t in σ (Song et al. 2021, eq. 14; Karras et al. 2022, sec. 3), so on
    # the same timesteps Euler's normal schedule gives DDIM's image; every other sampler makes another one.
    if (name, schedule) == ("euler", "normal"):
        assert np.abs(ddim_image - pixels(ours)).max() <= 1
    else:
        assert np.abs(ddim_image - pixels(ours)).max() > 2  # the sampler is not DDIM under another name


def test_refiner_img2img_equals_diffusers(refiner, tmp_path):
    """The refiner: bigG alone, aesthetic score 6 / 2.5 in the size ids, the empty negative prompt encoded."""
    pipe = diffusers_sdxl_pipeline(refiner, tmp_path, img2img=True)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    n, strength, seed = 10, 0.5, 4
    ours = generate(refiner, GenerationParams(PROMPT, steps=n, strength=strength, seed=seed), init_image=init)
    # our generator draws the VAE posterior sample, then the noise; diffusers draws them in the same order
    ref = pipe(PROMPT, image=init, strength=strength, negative_prompt=None, num_inference_steps=n, guidance_scale=7.5,
               eta=0.0, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    diff = max_pixel_diff(pixels(ours), ref)
    print(f"SDXL refiner img2img vs diffusers StableDiffusionXLImg2ImgPipeline: max pixel diff {diff * 255:.3f}/255")
    assert diff <= 1 / 255


def test_readme_sdxl_snippet_runs(tmp_path, monkeypatch):
    """README's SDXL example (a `python sdxl` block, which tests/test_readme.py leaves alone), on tiny checkpoints."""
    import re

    from _util import REPO

    blocks = re.findall(r"```python sdxl\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    tiny = {
        '"weights/sd_xl_base_1.0.safetensors"': repr(str(write_tiny_sdxl(tmp_path))),
        '"weights/sd_xl_refiner_1.0.safetensors"': repr(str(write_tiny_sdxl(tmp_path, refiner=True, seed=1))),
        "steps=30": "steps=4",
        "width=1024, height=1024": "width=64, height=64",
    }
    for old, new in tiny.items():
        assert old in code, f"README's SDXL snippet no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["base"].family is SDXL_BASE and namespace["refiner"].family is SDXL_REFINER
    assert Image.open(tmp_path / "xl.png").size == (64, 64)
