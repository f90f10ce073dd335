"""Every sampler × σ schedule through the whole pipeline on the tiny SD1 checkpoint, against diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with the matching scheduler on the same weights, x_T and
prompts: the latents at every step (within 1e-5 relative), the final image (within 1/255), plain and with GBSD's
stage switch at step k (diffusers through `callback_on_step_end` replacing `prompt_embeds`); img2img; sweep cells
against their independent runs; v-prediction.

Ancestral noise (euler_a): diffusers' scheduler draws each step's z with `randn_tensor(shape, generator)` from the
generator given to the pipeline; ours draws from the run's CPU generator seeded with `params.seed`. To compare the
samplers rather than two random streams, the tests replace `randn_tensor` in diffusers' scheduler module with a list
of z drawn here from `torch.Generator().manual_seed(seed)` in the order our pipeline draws them (for img2img after the
VAE posterior sample and the init noise ε, which come first), and check diffusers used them; so a wrong draw order,
batch or device on our side fails the comparison. (diffusers also draws a z at the last step, multiplied by σ_up = 0.)
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _reference import DDIM_CONFIG, diffusers_sd_pipeline
from _samplers import COMBOS, SD15_SHIPPED, diffusers_scheduler, inject_ancestral_noise, vp_scale
from _util import rel_err
from PIL import Image

import gbsd_core
from gbsd_core.ddim import DDIMSampler
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import (
    CFGStep,
    Stage,
    denoise,
    focus_conditioning,
    gbsd_stages,
    layout_steps,
)

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)
N, ALPHA, LAYOUT = 10, 0.5, 0.8  # the switch at step round(0.8·10) = 8
LATENT_TOL = 1e-5


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)  # responds to its conditioning, so a wrong switch shows (conftest.py)


@pytest.fixture(scope="module")
def pipe(bundle, tmp_path_factory):
    p = diffusers_sd_pipeline(bundle, tmp_path_factory.mktemp("sd-pipe"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def ancestral_noise(monkeypatch):
    return inject_ancestral_noise(monkeypatch)  # see the module docstring


def our_noise_draws(seed: int, n: int, skip: int = 0) -> list[torch.Tensor]:
    """The z our run draws: from the run's generator, after `skip` draws of the latent shape."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(skip + n)]
    return draws[skip:]


def _with_prediction(bundle, prediction_type: str):
    """The bundle with its UNet output read as `prediction_type` (a random tiny UNet is as good an ε- as a v-model)."""
    return replace(bundle, family=replace(bundle.family, prediction_type=prediction_type))


def our_states(bundle, params: GenerationParams, x_T: torch.Tensor, restart_history: bool = False) -> list:
    """generate's loop, with the per-step states kept (same sampler, embeddings, stages, generator)."""
    sampler = make_sampler(bundle.noise_schedule, bundle.family.prediction_type, params.sampler, params.schedule)
    ts = sampler.timesteps(params.steps)
    neg, g, loc = (bundle.encode_prompt(p) for p in (params.negative, params.prompt, params.focus or ""))
    n = len(ts)
    stages = ([Stage("global", range(n), g)] if params.focus is None
              else gbsd_stages(g, focus_conditioning(g, loc, params.alpha), n, params.layout))
    step = CFGStep(bundle.unet, sampler, params.cfg)
    with torch.inference_mode():
        return list(denoise(step, sampler.start_latents(x_T.clone()), ts, stages, neg, restart_history=restart_history,
                            generator=torch.Generator().manual_seed(params.seed)))


def reference_run(pipe, scheduler, x_T, n, switch_at=None, focus_embeds=None, restart=False, generator=None):
    """diffusers' pipeline with `scheduler`; returns (latents after every step, image in [0, 1])."""
    pipe.scheduler = scheduler
    latents = []

    def callback(p, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        if i == switch_at:
            if restart:  # DPM++: forget the history, so the next step is first order
                p.scheduler.model_outputs = [None] * p.scheduler.config.solver_order
                p.scheduler.lower_order_nums = 0
            return {"prompt_embeds": focus_embeds}  # with CFG: [negative; focus]
        return {}

    out = pipe(PROMPT, negative_prompt="", num_inference_steps=n, guidance_scale=7.5, latents=x_T.clone(),
               generator=generator, output_type="np", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **SIZE)
    return latents, out.images[0]


def _focus_embeds(pipe):
    g, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    loc, _ = pipe.encode_prompt(FOCUS, "cpu", 1, True, "")
    return torch.cat([neg, ALPHA * g + (1 - ALPHA) * loc])


def _pixel_diff(ours: Image.Image, ref: np.ndarray) -> float:
    assert 0.2 < np.mean((ref > 0.02) & (ref < 0.98)), "reference image is saturated: the parity check would be empty"
    return float(np.abs(np.asarray(ours, dtype=np.float64) / 255.0 - ref.astype(np.float64)).max())


def _worst_latent_err(name: str, states, ref_latents) -> float:
    assert len(states) == len(ref_latents)
    worst = 0.0
    for i, (s, r) in enumerate(zip(states, ref_latents)):
        # DPM++ in diffusers keeps the VP latent α·x; our σ-space x times α(σ after the step) (1 at the end).
        after = states[i + 1].sigma if i + 1 < len(states) else 0.0
        mine = s.latents * vp_scale(after) if name == "dpmpp_2m" else s.latents
        worst = max(worst, rel_err(mine, r))
    return worst


CASES = [(name, schedule, pred, switch) for name, schedule in COMBOS
         for pred, switch in (("epsilon", False), ("epsilon", True), ("v_prediction", True))]


@pytest.mark.parametrize("name, schedule, prediction_type, switch", CASES)
def test_txt2img_equals_diffusers_at_every_step(bundle, pipe, name, schedule, prediction_type, switch,
                                                ancestral_noise):
    b = _with_prediction(bundle, prediction_type)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, focus=FOCUS if switch else None, alpha=ALPHA, layout=LAYOUT, steps=N, seed=4,
                              sampler=name, schedule=schedule, **SIZE)
    states = our_states(b, params, x_T)
    result = generate(b, params, x_T=x_T)
    assert np.array_equal(np.asarray(b.decode_latents(states[-1].latents)[0]), np.asarray(result.image))  # = generate
    k = layout_steps(N, LAYOUT)
    if name == "euler_a":
        ancestral_noise.extend(our_noise_draws(params.seed, N))
    ref_latents, ref_image = reference_run(pipe, diffusers_scheduler(name, schedule, prediction_type), x_T, N,
                                           k - 1 if switch else None, _focus_embeds(pipe) if switch else None)
    lat, px = _worst_latent_err(name, states, ref_latents), _pixel_diff(result.image, ref_image)
    print(f"{name} {schedule} {prediction_type} {'switch at ' + str(k) if switch else 'plain'}: worst per-step latent "
          f"rel err {lat:.2e}, max pixel diff {px * 255:.3f}/255")
    assert lat <= LATENT_TOL and px <= 1 / 255
    if name == "euler_a":
        assert not ancestral_noise  # diffusers used exactly the noise our run drew
    if switch:  # the boundary is recorded, from the sampler's own schedule
        assert result.boundary_timestep == states[k].timestep and result.boundary_sigma == states[k].sigma
        assert [s.stage for s in states] == ["layout"] * k + ["focus"] * (N - k)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
def test_linspace_spacing_equals_a_diffusers_swap_on_sd15s_shipped_config(bundle, pipe, name, ancestral_noise):
    """spacing="linspace" (through a stepper: GenerationParams keeps the default spacing) is what a diffusers user
    gets from `XScheduler.from_config(sd15_pipe.scheduler.config)`: SD1.5's config names no spacing."""
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, steps=N, seed=4, sampler=name, **SIZE)
    step = CFGStep(bundle.unet, make_sampler(bundle.noise_schedule, bundle.family.prediction_type, name, "normal", spacing="linspace"), 7.5)
    result = generate(bundle, params, x_T=x_T, stepper=step)
    if name == "euler_a":
        ancestral_noise.extend(our_noise_draws(params.seed, N))
    ref_sched = diffusers_scheduler(name, config=SD15_SHIPPED)
    assert ref_sched.config.timestep_spacing == "linspace"
    _, ref_image = reference_run(pipe, ref_sched, x_T, N)
    px = _pixel_diff(result.image, ref_image)
    print(f"{name} linspace (SD1.5's shipped config): max pixel diff {px * 255:.3f}/255")
    assert px <= 1 / 255
    leading = generate(bundle, params, x_T=x_T)  # the default spacing is another schedule: the check can fail
    assert np.abs(np.asarray(leading.image, np.int16) - np.asarray(result.image, np.int16)).max() > 2


@pytest.mark.parametrize("schedule", ["normal", "karras"])
def test_the_stage_switch_matters_and_karras_moves_its_sigma(bundle, pipe, schedule):
    """Without the switch the reference's latents differ far beyond the tolerance (the comparison above can fail);
    with Karras σ the same step index sits at another noise level, much lower in σ."""
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    plain, _ = reference_run(pipe, diffusers_scheduler("dpmpp_2m", schedule), x_T, N)
    switched, _ = reference_run(pipe, diffusers_scheduler("dpmpp_2m", schedule), x_T, N, layout_steps(N, LAYOUT) - 1,
                                _focus_embeds(pipe))
    assert rel_err(plain[-1], switched[-1]) > 100 * LATENT_TOL
    p = GenerationParams(PROMPT, focus=FOCUS, layout=LAYOUT, steps=20, sampler="dpmpp_2m", schedule=schedule, **SIZE)
    r = generate(bundle, p)
    assert r.layout_steps == 16
    print(f"dpmpp_2m {schedule}: switch at step 16 of 20 at σ={r.boundary_sigma:.4f}, t={r.boundary_timestep}")
    if schedule == "karras":
        normal = make_sampler(bundle.noise_schedule, bundle.family.prediction_type, "dpmpp_2m")
        normal.timesteps(20)
        assert r.boundary_sigma < 0.5 * normal.sigma(16)


def test_dpmpp_2m_restart_at_the_switch_equals_diffusers_with_its_history_reset(bundle, pipe):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, focus=FOCUS, alpha=ALPHA, layout=LAYOUT, steps=N, sampler="dpmpp_2m",
                              schedule="karras", **SIZE)
    kept, restarted = our_states(bundle, params, x_T), our_states(bundle, params, x_T, restart_history=True)
    k = layout_steps(N, LAYOUT)
    ref_latents, _ = reference_run(pipe, diffusers_scheduler("dpmpp_2m", "karras"), x_T, N, k - 1,
                                   _focus_embeds(pipe), restart=True)
    lat = _worst_latent_err("dpmpp_2m", restarted, ref_latents)
    print(f"dpmpp_2m karras, restart at the switch: worst per-step latent rel err {lat:.2e}")
    assert lat <= LATENT_TOL
    assert rel_err(kept[k].latents, restarted[k].latents) > 1e-4  # the option changes the step after the switch


@pytest.mark.parametrize("name, schedule", COMBOS + [("ddim", "normal")])
def test_img2img_equals_diffusers_img2img_pipeline(bundle, pipe, name, schedule, ancestral_noise):
    from diffusers import StableDiffusionImg2ImgPipeline

    n, strength, seed = 10, 0.6, 7
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ours = generate(bundle, GenerationParams(PROMPT, steps=n, strength=strength, seed=seed, sampler=name,
                                             schedule=schedule), init_image=init)
    assert ours.executed_steps == int(n * strength)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    if name == "ddim":
        from diffusers import DDIMScheduler as DiffusersDDIM

        img2img.scheduler = DiffusersDDIM(**DDIM_CONFIG)
    else:
        img2img.scheduler = diffusers_scheduler(name, schedule)
    if name == "euler_a":  # after the VAE posterior sample and the init noise ε
        ancestral_noise.extend(our_noise_draws(seed, ours.executed_steps, skip=2))
    ref = img2img(PROMPT, image=init, strength=strength, negative_prompt="", num_inference_steps=n,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    px = _pixel_diff(ours.image, ref)
    print(f"img2img {name} {schedule} (strength {strength}, {ours.executed_steps} of {n} steps): max pixel diff "
          f"{px * 255:.3f}/255")
    assert px <= 1 / 255
    if name == "euler_a":
        assert not ancestral_noise


@pytest.mark.parametrize("name, schedule", [("euler_a", "karras"), ("dpmpp_2m", "karras"), ("euler", "normal")])
def test_sweep_cells_equal_their_independent_runs(bundle, name, schedule):
    """The layout stage is shared at batch 1; the focus stage branches the latents, Euler a's noise (drawn at the
    un-branched batch) and DPM++'s history; every cell must still be its own generate() run."""
    p = GenerationParams(PROMPT, layout=0.7, steps=N, seed=5, sampler=name, schedule=schedule, **SIZE)
    alphas, focus = [0.0, 0.6], ["a carrot", "a bunny"]
    cells = sweep(bundle, p, alphas=alphas, focus_prompts=focus)
    n_layout = layout_steps(N, 0.7)
    assert cells[0].unet_calls == n_layout + 4 * (N - n_layout)
    for r in cells:
        single = generate(bundle, replace(p, focus=r.params.focus, alpha=r.params.alpha))
        assert (r.boundary_sigma, r.boundary_timestep) == (single.boundary_sigma, single.boundary_timestep)
        diff = np.abs(np.asarray(r.image, np.int16) - np.asarray(single.image, np.int16)).max()
        assert diff <= 1, (r.params.focus, r.params.alpha, diff)  # batched vs batch-1 matmuls: ≤ 1/255


def test_ddim_default_is_unchanged_and_records_its_boundary(bundle):
    p = GenerationParams(PROMPT, focus=FOCUS, steps=N, seed=3, **SIZE)
    assert (p.sampler, p.schedule) == ("ddim", "normal")
    a, b = generate(bundle, p), generate(bundle, replace(p, sampler="ddim"))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    t = int(DDIMSampler().timesteps(N)[8])
    assert a.boundary_timestep == t == 101
    alpha_bar = float(bundle.noise_schedule.alphas_cumprod()[t])
    assert a.boundary_sigma == pytest.approx(((1 - alpha_bar) / alpha_bar) ** 0.5, rel=1e-12)
    assert generate(bundle, replace(p, focus=None)).boundary_sigma is None  # plain SD: no switch


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(sampler="heun"), "sampler must be one of"),
        (dict(schedule="exponential"), "schedule must be one of"),
        (dict(schedule="karras"), "for the σ samplers"),  # ddim + karras
        (dict(sampler="euler", eta=0.5), "eta is DDIM's"),
    ],
)
def test_bad_sampler_parameters_fail_before_any_compute(bad, match):
    class NoBundle:
        def __getattr__(self, name):
            raise AssertionError(f"touched bundle.{name} before validating")

    with pytest.raises(ValueError, match=match):
        generate(NoBundle(), GenerationParams(PROMPT, **bad))


def test_a_stepper_must_run_the_sampler_the_parameters_ask_for(bundle):
    sampler = make_sampler(bundle.noise_schedule, bundle.family.prediction_type, "euler", "karras")
    step = CFGStep(bundle.unet, sampler, 7.5)
    p = GenerationParams(PROMPT, steps=4, sampler="euler", **SIZE)
    with pytest.raises(ValueError, match="the stepper runs sampler 'euler' with the 'karras' schedule"):
        generate(bundle, p, stepper=step)
    plain = generate(bundle, replace(p, schedule="karras"))
    given = generate(bundle, replace(p, schedule="karras"), stepper=step)
    assert np.array_equal(np.asarray(plain.image), np.asarray(given.image))
