"""The noise schedule a diffusers folder declares (scheduler/scheduler_config.json) is built or refused by name
(gbsd_core/noise_schedule.py, diffusers_configs.scheduler_config), and runs as diffusers runs it: ᾱ, the trailing
spacing, DDIM and the σ samplers on a zero-terminal-SNR schedule step by step, and whole images within 1/255 of
StableDiffusionPipeline on tiny folders, plain and GBSD. Before, only prediction_type was read: every folder was
sampled on SD's 1000-step scaled-linear ᾱ, whatever it declared."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _reference import DDIM_CONFIG
from _samplers import LEADING, diffusers_scheduler
from _tiny import save_tiny_pipe
from _util import rel_err

from gbsd_core import diffusers_configs as dc
from gbsd_core.ddim import DDIMSampler
from gbsd_core.loading import load, save_single_file
from gbsd_core.noise_schedule import SD, NoiseSchedule, leading_timesteps, trailing_timesteps
from gbsd_core.params import GenerationParams, check_schedule
from gbsd_core.pipeline import generate
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import layout_steps

ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
SCHEDULES = {  # diffusers scheduler options over CompVis DDIM's (DDIM_CONFIG)
    "sd": {},
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "T500": dict(num_train_timesteps=500),
    "zero-snr": ZERO_SNR,
    "zero-snr-linear-T2000": dict(ZERO_SNR, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                  num_train_timesteps=2000),
}


def _ours(options: dict) -> NoiseSchedule:
    return dc.scheduler_config({**DDIM_CONFIG, **options})


def _theirs(options: dict):
    from diffusers import DDIMScheduler as DDDIM

    return DDDIM(**{**DDIM_CONFIG, **options})


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_equal_diffusers(name):
    """ᾱ built from the config equals diffusers' DDIMScheduler's for the same config: √ᾱ and √(1−ᾱ), the update's
    coefficients, within 1e-5 (diffusers rescales and takes the cumprod in float32, we in float64); a
    zero-terminal-SNR schedule ends at exactly 0 and keeps ᾱ_0."""
    ours, theirs = _ours(SCHEDULES[name]).alphas_cumprod().double(), _theirs(SCHEDULES[name]).alphas_cumprod.double()
    err = max(float((ours.sqrt() - theirs.sqrt()).abs().max()), float(((1 - ours).sqrt() - (1 - theirs).sqrt()).abs().max()))
    print(f"{name}: T {len(ours)}, max |√ᾱ, √(1-ᾱ) - diffusers'| {err:.1e}, ᾱ_T-1 {float(ours[-1]):.3g}")
    assert ours.shape == theirs.shape and err < 1e-5  # diffusers' float32 cumprod drifts with T (6e-6 at 2000)
    if SCHEDULES[name].get("rescale_betas_zero_snr"):
        assert float(ours[-1]) == 0.0 and float(ours[0]) == pytest.approx(float(_ours({
            k: v for k, v in SCHEDULES[name].items() if k != "rescale_betas_zero_snr"}).alphas_cumprod()[0]), rel=1e-6)


def test_sd_schedule_is_compvis_bit_for_bit():
    """ldm make_beta_schedule("linear"): linspace(√0.00085, √0.012, 1000)² in float64, cumprod, stored as float32."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    assert torch.equal(SD.alphas_cumprod(), torch.from_numpy(np.cumprod(1.0 - betas)).float())
    assert torch.equal(DDIMSampler().alphas_cumprod, SD.alphas_cumprod())


@pytest.mark.parametrize("T", [1000, 500, 1001])
def test_trailing_timesteps_equal_diffusers_for_every_step_count(T):
    """Every n from 1 to T. Where numpy's float arange gives diffusers n + 1 points (61 of 1000 steps: the last is
    t = −1), diffusers' first n are ours."""
    ref = _theirs(dict(num_train_timesteps=T, timestep_spacing="trailing"))
    longer = []
    for n in range(1, T + 1):
        ref.set_timesteps(n)
        ours = trailing_timesteps(n, T)
        assert torch.equal(ours, ref.timesteps[:n]), n
        assert int(ours[0]) == T - 1 and int(ours[-1]) >= 0
        if len(ref.timesteps) != n:
            longer.append(n)
    print(f"T {T}: diffusers runs n + 1 trailing timesteps for {len(longer)} step counts, e.g. {longer[:5]}")
    ref = _theirs(dict(num_train_timesteps=T))
    for n in (1, 7, 50, T - 1):  # and the leading rule is CompVis DDIM's, as before
        ref.set_timesteps(n)
        assert torch.equal(leading_timesteps(n, T), ref.timesteps)


@pytest.mark.parametrize("n", [1, 3, 10, 50, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_on_a_zero_snr_schedule_steps_as_diffusers(n, eta):
    """DDIM on the rescaled schedule, v-prediction, trailing timesteps (the default of such a schedule): every step
    of a run equals diffusers' DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing").step, η noise
    given to both. The first step starts at t = 999, SNR 0, where x̂_0 = −v."""
    ours = DDIMSampler("v_prediction", _ours(ZERO_SNR))
    assert ours.spacing == "trailing"
    ref = _theirs(ZERO_SNR)
    ts = ours.timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ts, ref.timesteps[:n]) and int(ts[0]) == 999
    g = torch.Generator().manual_seed(n)
    x, worst = torch.randn(1, 4, 8, 8, generator=g), 0.0
    for i, t in enumerate(ts):  # each step from the same state in both: the bound is per step
        v = torch.randn(1, 4, 8, 8, generator=g) + 0.1 * x  # a "model output" that depends on the latent
        z = torch.randn(1, 4, 8, 8, generator=g)
        a, _ = ours.update(x, i, v, eta=eta, noise=z if eta else None)
        b = ref.step(v, int(t), x, eta=eta, variance_noise=z if eta else None).prev_sample
        worst, x = max(worst, rel_err(a, b)), a
    print(f"zero-SNR DDIM, {n} steps, η {eta}: max per-step rel err {worst:.1e}")
    # η = 1 at t = 999: 1 − ᾱ_prev − σ_t² is 0 exactly, and diffusers' float32 rounding leaves ~1e-8 there, whose
    # square root (~1e-4) multiplies ε̂: that is the η = 1 bound, diffusers' rounding, not a difference in the step
    assert worst < (1e-5 if eta == 0 else 5e-4)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("schedule", ["normal", "karras"])
def test_sigma_samplers_on_a_zero_snr_schedule_take_diffusers_sigmas(name, schedule):
    """σ_{T−1} is infinite at zero SNR; as diffusers' σ schedulers, ᾱ_{T−1} is taken as 2^−24 (σ_max = 4096). The
    trailing spacing's timesteps and σ, and the start scaling (init_noise_sigma), equal diffusers' for each method."""
    ref = diffusers_scheduler(name, schedule, "v_prediction",
                              dict(LEADING, rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    ours = make_sampler(_ours(ZERO_SNR), "v_prediction", name, schedule)  # the schedule's spacing: trailing
    assert ours.spacing == "trailing"
    for n in (1, 4, 20):
        ts = ours.timesteps(n)
        ref.set_timesteps(n)
        assert rel_err(ts.double(), ref.timesteps.double()) < 1e-6, (n, ts, ref.timesteps)
        assert rel_err(ours.sigmas, ref.sigmas.double()) < 1e-5
        # diffusers scales x_T by init_noise_sigma in its own space: σ-space for Euler and Euler a (σ_0 under
        # trailing), the VP sample for DPM-Solver (1), which is √(σ_0²+1)·x_T in σ-space
        vp = 1.0 if name != "dpmpp_2m" else float(ours.sigmas[0] ** 2 + 1) ** 0.5
        assert float(ours.start_latents(torch.ones(1))) == pytest.approx(vp * float(ref.init_noise_sigma), rel=1e-5)
    print(f"{name} {schedule}: σ_0 {float(ours.sigmas[0]):.2f} (diffusers {float(ref.sigmas[0]):.2f})")


def test_every_option_of_the_ddpm_scheduler_classes_is_classified():
    """Each option of each diffusers scheduler class gbsd accepts is a schedule key (built or refused), an option of
    that class's own sampler (not read) or a fixed one: no option is silently ignored that could change ᾱ."""
    import diffusers

    known = {*dc.SCHEDULE_KEYS, *dc.SAMPLER_OPTIONS, *dc.SCHEDULER_FIXED}
    checked = 0
    for name in sorted(dc.DDPM_SCHEDULERS):
        cls = getattr(diffusers, name)
        options = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs", "args")}
        if not options:  # a placeholder class whose extra dependency (scipy, torchsde) is missing here
            continue
        checked += 1
        assert options - known == set(), f"{name}: {options - known}"
        assert {"beta_schedule", "num_train_timesteps"} <= options  # a DDPM schedule indeed
    assert checked >= 15


SHIPPED = {  # what the released folders hold (their scheduler_config.json, the keys that matter)
    "sd15-pndm": dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      trained_betas=None, clip_sample=False),
    "sd21-ddim-v": dict(_class_name="DDIMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                        clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction",
                        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None),
    "sdxl-euler": dict(_class_name="EulerDiscreteScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                       beta_start=0.00085, clip_sample=False, interpolation_type="linear", num_train_timesteps=1000,
                       prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
                       steps_offset=1, timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_released_scheduler_configs_give_sds_schedule(name):
    assert dc.scheduler_config(SHIPPED[name]) == SD
    assert dc.scheduler_config({"prediction_type": "epsilon"}) == NoiseSchedule(1000, 0.0001, 0.02, "linear")


# ------------------------------------------------------------------------------------ whole runs, against diffusers
FOLDERS = {  # (SD2's text tower: v-prediction needs the SD2-768-v family, scheduler options)
    "zero-snr": (True, ZERO_SNR),
    "linear-T500": (False, dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=500)),
}


@pytest.fixture(scope="module", params=list(FOLDERS))
def folder(request, tmp_path_factory) -> Path:
    sd2, options = FOLDERS[request.param]
    return save_tiny_pipe(tmp_path_factory.mktemp("schedule") / request.param, sd2=sd2, scheduler=options)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


@pytest.mark.parametrize("sampler, focus", [("ddim", None), ("ddim", "a carrot"), ("euler", None),
                                            ("dpmpp_2m", "a carrot")], ids=["ddim-plain", "ddim-gbsd", "euler-plain",
                                                                            "dpmpp_2m-gbsd"])
def test_a_folder_with_its_own_schedule_generates_what_diffusers_generates(folder, sampler, focus):
    """gbsd on the folder against StableDiffusionPipeline.from_pretrained on it (its scheduler_config.json; for Euler
    and DPM++ 2M that config in their classes), at the native 64x64: plain, and GBSD with the embeddings switched at
    the stage boundary in callback_on_step_end. Within 1/255."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    prompt, n, alpha, layout = "a bunny and a carrot in a garden, bokeh", 10, 0.3, 0.6
    b = load(folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                  requires_safety_checker=False)
    if sampler == "euler":
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    elif sampler == "dpmpp_2m":
        ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config, algorithm_type="dpmsolver++",
                                                                solver_order=2)
    ref.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    ours = generate(b, GenerationParams(prompt, focus=focus, alpha=alpha, layout=layout, steps=n, sampler=sampler),
                    x_T=x_T)
    callback = None
    if focus is not None:
        g, neg = ref.encode_prompt(prompt, "cpu", 1, True, "")
        loc, _ = ref.encode_prompt(focus, "cpu", 1, True, "")
        n_layout = layout_steps(n, layout)

        def callback(pipe, i, t, kwargs):
            return {"prompt_embeds": torch.cat([neg, alpha * g + (1 - alpha) * loc])} if i == n_layout - 1 else {}
    theirs = ref(prompt, negative_prompt="", num_inference_steps=n, guidance_scale=7.5, latents=x_T.clone(),
                 output_type="np", callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"]).images[0]
    assert 0.2 < np.mean((theirs > 0.02) & (theirs < 0.98)), "saturated reference: the comparison would be empty"
    diff = float(np.abs(_pixels(ours.image) - theirs).max())
    sd = b.noise_schedule
    print(f"{folder.name} ({sd.beta_schedule}, T {sd.num_train_timesteps}, zero SNR {sd.zero_terminal_snr}, "
          f"{b.noise_schedule.spacing}), {sampler}, {focus or 'plain'}: max pixel diff {diff * 255:.3f}/255 vs diffusers")
    assert diff <= 1 / 255


def test_the_models_schedule_decides_what_a_run_can_do(folder, tmp_path):
    """check_schedule asks the model's own schedule: the zero-SNR folder's trailing DDIM runs all 1000 steps (SD's
    leading one cannot); the T = 500 folder has 500 steps at most. A single file cannot carry the schedule, so
    writing one is refused."""
    b = load(folder)
    T = b.noise_schedule.num_train_timesteps
    if b.noise_schedule.zero_terminal_snr:
        assert check_schedule(GenerationParams("p", steps=1000), False, b.noise_schedule) == 1000
        with pytest.raises(ValueError, match="start at t=1000"):  # SD's leading DDIM cannot
            check_schedule(GenerationParams("p", steps=1000), False)
    else:
        with pytest.raises(ValueError, match=f"must be in \\[1, {T}\\]"):
            check_schedule(GenerationParams("p", steps=T + 1), False, b.noise_schedule)
    with pytest.raises(ValueError, match="noise schedule"):
        save_single_file(b, tmp_path / "x.safetensors")
    described = b.describe()["noise_schedule"]
    print(described)
    assert f"{T} timesteps" in described and b.noise_schedule.spacing in described


def test_the_cli_runs_a_zero_snr_folder_as_the_api_does(tmp_path, capsys, monkeypatch, tiny_ckpt):
    """The same pixels as the Python API; `gbsd info` says what it built; the step count is checked by the model's
    schedule (1000 trailing steps pass validation, SD's leading DDIM refuses them)."""
    from _cli import Loaded, run_cli
    from PIL import Image

    from gbsd_core.cli import common

    folder = save_tiny_pipe(tmp_path / "zsnr", sd2=True, scheduler=ZERO_SNR)
    code, out, err = run_cli(["generate", "a cat", "--focus", "a dog", "--weights", folder, "--steps", "4", "--size",
                              "16x16", "-q", "-o", tmp_path / "o.png"], capsys)
    assert code == 0, err
    ours = generate(load(folder), GenerationParams("a cat", focus="a dog", steps=4, width=16, height=16)).image
    assert np.array_equal(np.asarray(ours), np.asarray(Image.open(tmp_path / "o.png").convert("RGB")))
    code, out, _ = run_cli(["info", folder], capsys)
    assert code == 0 and "rescaled to zero terminal SNR; trailing spacing" in out
    print(json.dumps(out.splitlines()[:12]))

    def loaded(*args):
        raise Loaded

    monkeypatch.setattr(common, "load_checkpoint", loaded)
    with pytest.raises(Loaded):  # validation passed
        run_cli(["generate", "p", "--weights", folder, "--steps", "1000", "-o", tmp_path / "p.png"], capsys)
    code, _, err = run_cli(["generate", "p", "--weights", tiny_ckpt, "--steps", "1000", "-o", tmp_path / "p.png"],
                           capsys)
    assert code == 2 and "--steps 1000: 1000 steps start at t=1000" in err
