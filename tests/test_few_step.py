"""Few-step sampling (README "Few-step") on the tiny SD1 checkpoint against diffusers on the same weights, x_T and
prompts, within 1/255: Euler / Euler ancestral with the trailing spacing at 1, 2 and 4 steps with guidance off (what
SD-Turbo's and SDXL-Turbo's cards run), LCMScheduler at 4 and 8 steps, also with an LCM-LoRA-shaped LoRA (diffusers'
`load_lora_weights`), plain and with GBSD's stage switch (diffusers through `callback_on_step_end` replacing
`prompt_embeds`); LCM through img2img and a sweep; the guidance rule; GBSD's splits at 2–8 steps.

Fresh noise (Euler a, LCM): diffusers' schedulers draw it with `randn_tensor` in their module; the tests replace it
with the z our run draws from the run's generator, in our order, and check diffusers used them all (as
test_pipeline_samplers.py does for Euler a).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _lora import adapted, kohya_state_dict, layers, write
from _reference import diffusers_sd_pipeline
from _samplers import LEADING
from PIL import Image

import gbsd_core
from gbsd_core.lcm import LCMSampler
from gbsd_core.lora import apply_loras, load_lora
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import CFGStep, guidance, layout_steps

PROMPT, FOCUS, ALPHA = "a bunny and a carrot in a garden, bokeh", "a carrot", 0.5
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)


@pytest.fixture(scope="module")
def pipe(bundle, tmp_path_factory):
    p = diffusers_sd_pipeline(bundle, tmp_path_factory.mktemp("sd-pipe"))
    p.set_progress_bar_config(disable=True)
    return p


def _inject(monkeypatch, module_name: str) -> list[torch.Tensor]:
    import importlib

    mod = importlib.import_module(module_name)
    given: list[torch.Tensor] = []

    def injected(shape, generator=None, device=None, dtype=None, layout=None):
        z = given.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return z.to(device=device, dtype=dtype)

    monkeypatch.setattr(mod, "randn_tensor", injected)
    return given


def _draws(seed: int, n: int, skip: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 8, 8, generator=g) for _ in range(skip + n)][skip:]


def diffusers_scheduler(name: str):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler

    if name == "lcm":  # the LCM-LoRA cards' swap: LCMScheduler.from_config(pipe.scheduler.config)
        return LCMScheduler.from_config(LEADING)
    cls = EulerDiscreteScheduler if name == "euler" else EulerAncestralDiscreteScheduler
    return cls.from_config(dict(LEADING, timestep_spacing="trailing"))  # SD-Turbo's shipped scheduler config


def reference(pipe, scheduler, x_T, n, cfg, switch_at=None):
    """diffusers' image in [0, 1], the prompt embeddings replaced by the focus conditioning after step `switch_at`."""
    pipe.scheduler = scheduler
    g, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    loc, _ = pipe.encode_prompt(FOCUS, "cpu", 1, True, "")
    focus = ALPHA * g + (1 - ALPHA) * loc
    focus = torch.cat([neg, focus]) if cfg > 1 else focus  # diffusers guides only above 1

    def callback(p, i, t, kwargs):
        return {"prompt_embeds": focus} if i == switch_at else {}

    return pipe(PROMPT, negative_prompt="", num_inference_steps=n, guidance_scale=cfg, latents=x_T.clone(),
                output_type="np", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                **SIZE).images[0]


def _px(ours: Image.Image, ref: np.ndarray) -> float:
    assert 0.2 < np.mean((ref > 0.02) & (ref < 0.98)), "reference image is saturated: the parity check would be empty"
    return float(np.abs(np.asarray(ours, dtype=np.float64) / 255.0 - ref.astype(np.float64)).max())


TRAILING = [(name, n, gbsd) for name in ("euler", "euler_a") for n in (1, 2, 4) for gbsd in (False, True)
            if not (gbsd and n == 1)]


@pytest.mark.parametrize("name, n, gbsd", TRAILING)
def test_trailing_guidance_off_equals_diffusers(bundle, pipe, monkeypatch, name, n, gbsd):
    """SD-Turbo's recipe: Euler (a) with timestep_spacing="trailing", guidance_scale=0.0, 1–4 steps."""
    noise = _inject(monkeypatch, "diffusers.schedulers.scheduling_euler_ancestral_discrete")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, focus=FOCUS if gbsd else None, alpha=ALPHA, steps=n, cfg=0.0, seed=4,
                              sampler=name, spacing="trailing", **SIZE)
    ours = generate(bundle, params, x_T=x_T)
    assert ours.unet_calls == n  # guidance off: one UNet row per step
    k = ours.layout_steps if gbsd else None
    if name == "euler_a":
        noise.extend(_draws(params.seed, n))  # diffusers draws one at the last step too (times σ_up = 0)
    px = _px(ours.image, reference(pipe, diffusers_scheduler(name), x_T, n, 0.0, None if k is None else k - 1))
    print(f"{name} trailing {n} steps cfg 0 {'GBSD switch at ' + str(k) if gbsd else 'plain'}: max pixel diff "
          f"{px * 255:.3f}/255")
    assert px <= 1 / 255 and not noise
    leading = generate(bundle, replace(params, spacing=None), x_T=x_T)  # the spacing matters: the check can fail
    assert np.abs(np.asarray(leading.image, np.int16) - np.asarray(ours.image, np.int16)).max() > 2


LCM_CASES = [(n, gbsd) for n in (4, 8) for gbsd in (False, True)]


@pytest.mark.parametrize("n, gbsd", LCM_CASES)
def test_lcm_equals_diffusers_lcm_scheduler(bundle, pipe, monkeypatch, n, gbsd):
    """LCM-LoRA's recipe: LCMScheduler, 4–8 steps, CFG 1–2 (1.5 here: guided)."""
    noise = _inject(monkeypatch, "diffusers.schedulers.scheduling_lcm")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, focus=FOCUS if gbsd else None, alpha=ALPHA, steps=n, cfg=1.5, seed=4,
                              sampler="lcm", **SIZE)
    ours = generate(bundle, params, x_T=x_T)
    noise.extend(_draws(params.seed, n - 1))  # every step but the last re-noises
    k = ours.layout_steps if gbsd else None
    px = _px(ours.image, reference(pipe, diffusers_scheduler("lcm"), x_T, n, 1.5, None if k is None else k - 1))
    print(f"lcm {n} steps cfg 1.5 {'GBSD switch at ' + str(k) if gbsd else 'plain'}: max pixel diff {px * 255:.3f}/255")
    assert px <= 1 / 255 and not noise


# The modules LCM-LoRA adapts: the default `lora_target_modules` of diffusers' LCM-LoRA distillation script
# (examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py): every attention projection, proj_in/out, the
# feed-forward, the resnets' convs and time projections, the down/upsampler convs; UNet only, no text encoder.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@pytest.fixture(scope="module")
def lcm_lora(pipe, tmp_path_factory):
    """An LCM-LoRA-shaped file (kohya names over diffusers' UNet modules, rank 8, alpha 8: scale 1), seeded."""
    targets = [(n, s) for n, s in layers(pipe.unet) if n.endswith(LCM_LORA_TARGETS)]
    sd = kohya_state_dict([("lora_unet_", targets)], seed=11, rank=8, alpha=8.0, std=0.08)
    return sd, write(sd, tmp_path_factory.mktemp("lcm-lora") / "lcm-lora-tiny.safetensors")


@pytest.mark.parametrize("n, cfg, gbsd", [(n, cfg, gbsd) for n, cfg in ((4, 1.0), (8, 1.5)) for gbsd in (False, True)])
def test_lcm_lora_equals_diffusers_load_lora_weights(bundle, pipe, lcm_lora, monkeypatch, n, cfg, gbsd):
    """LCM-LoRA's card: the LoRA at scale 1 on the base model, LCMScheduler, 4–8 steps, guidance 1 (off) or 1.5."""
    sd, path = lcm_lora
    lora = load_lora(path)
    noise = _inject(monkeypatch, "diffusers.schedulers.scheduling_lcm")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, focus=FOCUS if gbsd else None, alpha=ALPHA, steps=n, cfg=cfg, seed=4,
                              sampler="lcm", **SIZE)
    with apply_loras(bundle, [(lora, 1.0)]) as applied:
        ours = generate(bundle, params, x_T=x_T)
    plain = generate(bundle, params, x_T=x_T)  # without the LoRA
    noise.extend(_draws(params.seed, n - 1))
    k = ours.layout_steps if gbsd else None
    pipe.load_lora_weights(dict(sd), adapter_name="lcm")
    try:
        count = adapted(pipe.unet, pipe.text_encoder)
        ref = reference(pipe, diffusers_scheduler("lcm"), x_T, n, cfg, None if k is None else k - 1)
    finally:
        pipe.unload_lora_weights()
    px = _px(ours.image, ref)
    print(f"LCM-LoRA (rank 8, {len(lora.modules)} modules) lcm {n} steps cfg {cfg} "
          f"{'GBSD switch at ' + str(k) if gbsd else 'plain'}: max pixel diff {px * 255:.3f}/255; without the LoRA "
          f"{_px(plain.image, ref) * 255:.1f}/255")
    assert px <= 1 / 255 and not noise
    assert applied.report.modules == count == len(lora.modules) > 20
    assert _px(plain.image, ref) > 2 / 255  # the LoRA changes the image: the comparison can fail


def test_lcm_timesteps_are_diffusers(bundle):
    from diffusers import LCMScheduler

    for n in (1, 2, 3, 4, 6, 7, 8, 13, 50):
        ref = LCMScheduler.from_config(LEADING)
        ref.set_timesteps(n)
        ours = LCMSampler("epsilon", bundle.noise_schedule).timesteps(n)
        assert ours.tolist() == ref.timesteps.tolist(), n
    assert LCMSampler().timesteps(4).tolist() == [999, 759, 499, 259]


def test_lcm_img2img_equals_diffusers_img2img_pipeline(bundle, pipe, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    noise = _inject(monkeypatch, "diffusers.schedulers.scheduling_lcm")
    n, strength, seed = 8, 0.5, 7
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ours = generate(bundle, GenerationParams(PROMPT, steps=n, strength=strength, seed=seed, sampler="lcm", cfg=1.5),
                    init_image=init)
    assert ours.executed_steps == 4
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffusers_scheduler("lcm")
    noise.extend(_draws(seed, ours.executed_steps - 1, skip=2))  # after the VAE posterior sample and the init noise
    ref = img2img(PROMPT, image=init, strength=strength, negative_prompt="", num_inference_steps=n, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    px = _px(ours.image, ref)
    print(f"lcm img2img (strength {strength}, 4 of 8 steps): max pixel diff {px * 255:.3f}/255")
    assert px <= 1 / 255 and not noise


@pytest.mark.parametrize("name, spacing", [("lcm", None), ("euler_a", "trailing")])
def test_few_step_sweep_cells_equal_their_independent_runs(bundle, name, spacing):
    """4 steps at the layout fraction 0.8: 3 layout steps shared, 1 focus step per cell, the fresh noise of each
    cell's own run."""
    p = GenerationParams(PROMPT, steps=4, seed=5, sampler=name, spacing=spacing, cfg=0.0, **SIZE)
    cells = sweep(bundle, p, alphas=[0.0, 0.6], focus_prompts=["a carrot", "a bunny"])
    assert cells[0].layout_steps == 3 and cells[0].unet_calls == 3 + 4 * 1
    for r in cells:
        single = generate(bundle, replace(p, focus=r.params.focus, alpha=r.params.alpha))
        diff = np.abs(np.asarray(r.image, np.int16) - np.asarray(single.image, np.int16)).max()
        assert diff <= 1, (r.params.focus, r.params.alpha, diff)


# ------------------------------------------------------------------------------------------- guidance rule


def test_guidance_rule_is_diffusers():
    assert [guidance(c) for c in (None, 0.0, 0.5, 1.0, 1.0001, 7.5)] == [None, None, None, None, 1.0001, 7.5]


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_cfg_at_most_one_is_the_conditional_image_as_diffusers(bundle, pipe, cfg):
    """A turbo card's guidance_scale=0.0 (and an SD1.5 user's --cfg 0, README "Few-step"): the conditional branch
    alone, equal to diffusers at that guidance scale, and to cfg 1; not the unconditional image."""
    from diffusers import DDIMScheduler

    from _reference import DDIM_CONFIG

    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, steps=4, cfg=cfg, **SIZE)
    ours = generate(bundle, params, x_T=x_T)
    assert ours.unet_calls == 4
    px = _px(ours.image, reference(pipe, DDIMScheduler(**DDIM_CONFIG), x_T, 4, cfg))
    print(f"ddim 4 steps cfg {cfg}: max pixel diff {px * 255:.3f}/255")
    assert px <= 1 / 255
    one = generate(bundle, replace(params, cfg=1.0), x_T=x_T)
    assert np.array_equal(np.asarray(one.image), np.asarray(ours.image))
    # the old reading of cfg 0, uncond + 0·(cond − uncond) = the negative prompt's image, is another image
    uncond = generate(bundle, replace(params, prompt=""), x_T=x_T)
    assert np.abs(np.asarray(uncond.image, np.int16) - np.asarray(ours.image, np.int16)).max() > 2


# ------------------------------------------------------------------------------------------- GBSD at few steps

# The documented table (README "Few-step"): n_layout + n_focus at the layout fractions 0.5, 0.7, 0.8, 0.9
SPLITS = {2: (1, 1, 1, 1), 3: (2, 2, 2, 2), 4: (2, 3, 3, 3), 5: (3, 4, 4, 4), 6: (3, 4, 5, 5), 7: (4, 5, 6, 6),
          8: (4, 6, 6, 7)}


@pytest.mark.parametrize("n", sorted(SPLITS))
def test_gbsd_splits_at_few_steps(n):
    assert tuple(layout_steps(n, f) for f in (0.5, 0.7, 0.8, 0.9)) == SPLITS[n]
    for f in (0.01, 0.3, 0.99):  # neither stage is ever empty
        assert 1 <= layout_steps(n, f) <= n - 1
    assert (layout_steps(n, 0.0), layout_steps(n, 1.0)) == (0, n)  # one stage, asked for


def test_gbsd_at_one_step_is_refused(bundle):
    with pytest.raises(ValueError, match="GBSD at 1 step"):
        layout_steps(1, 0.8)
    with pytest.raises(ValueError, match="GBSD at 1 step"):
        generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=1, **SIZE))
    assert generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=1, layout=1.0, **SIZE)).layout_steps == 1


def test_lcm_fast_path_equals_the_plain_step(bundle):
    """The fast step (its per-step coefficients from the sampler's own update) runs LCM as CFGStep does."""
    from gbsd_core.fast import FastOptions, make_stepper

    params = GenerationParams(PROMPT, focus=FOCUS, steps=4, cfg=1.5, seed=3, sampler="lcm", **SIZE)
    plain = generate(bundle, params)
    with make_stepper(bundle, FastOptions(), 1.5, 0.0, "lcm") as step:
        fast = generate(bundle, params, stepper=step)
    assert np.abs(np.asarray(plain.image, np.int16) - np.asarray(fast.image, np.int16)).max() <= 1


def test_lcm_refuses_what_its_schedule_cannot_run(bundle):
    with pytest.raises(ValueError, match="at most 50 steps"):
        make_sampler(bundle.noise_schedule, "epsilon", "lcm").timesteps(51)
    with pytest.raises(ValueError, match="eta"):
        GenerationParams(PROMPT, sampler="lcm", eta=0.5)
    with pytest.raises(ValueError, match="spacing"):
        GenerationParams(PROMPT, sampler="lcm", spacing="trailing")
    with pytest.raises(ValueError, match="spacing"):
        GenerationParams(PROMPT, spacing="backwards")
    with pytest.raises(ValueError, match="σ samplers"):
        GenerationParams(PROMPT, sampler="ddim", spacing="k-diffusion")
    step = CFGStep(bundle.unet, make_sampler(bundle.noise_schedule, "epsilon", "euler"), 0.0)
    with pytest.raises(ValueError, match="spacing"):
        generate(bundle, GenerationParams(PROMPT, sampler="euler", spacing="trailing", cfg=0.0), stepper=step)
